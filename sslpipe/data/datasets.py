"""Datasets by name, with per-dataset normalisation statistics and a clear error when files are missing.

Splits: ``pretrain`` (what self-supervised training sees; STL-10 adds its unlabeled set, label -1),
``train`` (labelled training images, for probes and kNN banks) and ``val`` (held-out evaluation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

Split = Literal["pretrain", "train", "val"]
Transform = Optional[Callable[[Any], Any]]


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the pipeline needs to know about a dataset before loading it."""

    name: str
    builder: Callable[[str, Split, Transform, bool], Dataset]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_image_size: int
    num_classes: Optional[int]  # None: discovered from the files (imagefolder)
    eval_resize_ratio: float = 1.0  # resize side / crop side at evaluation (ImageNet: 256/224)


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to the registry under ``spec.name``."""
    DATASETS[spec.name] = spec
    return spec


def dataset_spec(name: str) -> DatasetSpec:
    """Look a dataset up by name, naming the valid choices when it is unknown."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None


def build_dataset(name: str, root: str, split: Split, transform: Transform = None, download: bool = False) -> Dataset:
    """Instantiate dataset ``name``'s ``split`` with ``transform`` applied to each image."""
    return dataset_spec(name).builder(root, split, transform, download)


class IndexedDataset(Dataset):
    """Wrap a ``(image, label)`` dataset so items become ``(image, label, index)``.

    Methods with per-sample state (PIRL's memory bank) need the index; the others ignore it.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image, label = self.base[index]
        return image, label, index


def _missing(name: str, path: str, hint: str) -> FileNotFoundError:
    return FileNotFoundError(f"{name} not found under {os.path.abspath(path)!r}. {hint}")


# ---------------------------------------------------------------- digits (embedded default)
class DigitsDataset(Dataset):
    """scikit-learn's 1,797 8x8 handwritten digits as RGB PIL images with a fixed stratified split.

    80% train (1,437) / 20% val (360), split with a fixed seed so every run sees the same images.
    """

    def __init__(self, split: Split, transform: Transform = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
        idx_train, idx_val = train_test_split(
            np.arange(len(images)), test_size=0.2, random_state=0, stratify=digits.target
        )
        idx = idx_val if split == "val" else idx_train
        self.images = images[idx]
        self.targets = digits.target[idx].astype(np.int64)
        self.transform = transform
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


register_dataset(
    DatasetSpec(
        "digits",
        lambda root, split, transform, download: DigitsDataset(split, transform),
        mean=(0.3053, 0.3053, 0.3053),
        std=(0.3759, 0.3759, 0.3759),
        default_image_size=32,
        num_classes=10,
    )
)


# ---------------------------------------------------------------- fake (tests)
def _fake(root: str, split: Split, transform: Transform, download: bool) -> Dataset:
    from torchvision.datasets import FakeData

    size = 64 if split == "val" else 256
    # A different random_offset per split so val images are not the train images.
    return FakeData(size=size, image_size=(3, 32, 32), num_classes=10, transform=transform, random_offset=0 if split != "val" else 10_000)


register_dataset(DatasetSpec("fake", _fake, (0.5, 0.5, 0.5), (0.29, 0.29, 0.29), 32, 10))


# ---------------------------------------------------------------- torchvision datasets
def _torchvision(cls_name: str, folder: str):
    def build(root: str, split: Split, transform: Transform, download: bool) -> Dataset:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        try:
            if cls_name == "STL10":
                tv_split = {"pretrain": "train+unlabeled", "train": "train", "val": "test"}[split]
                return cls(root, split=tv_split, transform=transform, download=download)
            return cls(root, train=split != "val", transform=transform, download=download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise _missing(
                cls_name,
                os.path.join(root, folder),
                f"Pass --data.download true to fetch it into {root!r} (needs network), or copy the extracted "
                f"'{folder}' folder there and set --data.root. ({err})",
            ) from None

    return build


register_dataset(
    DatasetSpec("cifar10", _torchvision("CIFAR10", "cifar-10-batches-py"), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, 10)
)
register_dataset(
    DatasetSpec("cifar100", _torchvision("CIFAR100", "cifar-100-python"), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, 100)
)
register_dataset(
    DatasetSpec("stl10", _torchvision("STL10", "stl10_binary"), (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), 96, 10)
)


# ---------------------------------------------------------------- ImageNet-style folders
def _imagefolder(root: str, split: Split, transform: Transform, download: bool) -> Dataset:
    from torchvision.datasets import ImageFolder

    sub = "val" if split == "val" else "train"
    path = os.path.join(root, sub)
    if not os.path.isdir(path):
        raise _missing(
            "imagefolder split",
            path,
            "Expected an ImageNet-style layout <root>/train/<class>/<image> and <root>/val/<class>/<image>; "
            "set --data.root to the folder that holds train/ and val/.",
        )
    # torchvision's default loader opens with PIL and converts to RGB: grayscale/CMYK/palette all become RGB.
    return ImageFolder(path, transform=transform)


def imagefolder_num_classes(root: str) -> int:
    """Number of class sub-folders of ``<root>/train`` (the imagefolder label space)."""
    path = os.path.join(root, "train")
    if not os.path.isdir(path):
        raise _missing("imagefolder split", path, "Set --data.root to the folder that holds train/ and val/.")
    return sum(1 for entry in os.scandir(path) if entry.is_dir())


register_dataset(
    DatasetSpec("imagefolder", _imagefolder, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, None, eval_resize_ratio=256 / 224)
)

