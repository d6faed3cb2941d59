"""Datasets by name, with per-dataset normalisation statistics and a clear error when files are missing.

Splits: ``pretrain`` (what self-supervised training sees; STL-10 adds its unlabeled set, label -1),
``train`` (labelled training images, for probes and kNN banks) and ``val`` (held-out evaluation).
Label -1 means "no label" everywhere (STL-10's unlabeled images, every image of ``unlabeled``).

The folder datasets (``imagefolder``, ``unlabeled``) are scanned when built (:mod:`sslpipe.data.scan`) and
read every file through one loader (:func:`sslpipe.data.images.load_rgb`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sslpipe.data.images import load_rgb
from sslpipe.data.scan import OnBadImage, class_folders, log_warning, scan_folder, shared_classes, usable_files
from sslpipe.errors import ConfigError, DataError, DataNotFoundError

Split = Literal["pretrain", "train", "val"]
Transform = Optional[Callable[[Any], Any]]


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the pipeline needs to know about a dataset before loading it."""

    name: str
    # (root, split, transform, download, on_bad_image) -> dataset
    builder: Callable[[str, Split, Transform, bool, OnBadImage], Dataset]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_image_size: int
    num_classes: Optional[int]  # None: discovered from the files (imagefolder); 0: no labels (unlabeled)
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
        raise ConfigError(
            f"data.dataset={name!r} is unknown: choose one of {', '.join(map(repr, sorted(DATASETS)))}"
        ) from None


def build_dataset(
    name: str,
    root: str,
    split: Split,
    transform: Transform = None,
    download: bool = False,
    on_bad_image: OnBadImage = "error",
) -> Dataset:
    """Instantiate dataset ``name``'s ``split`` with ``transform`` applied to each image.

    ``on_bad_image`` applies to the folder datasets: ``error`` fails naming every unreadable file, ``skip``
    leaves them out (see :mod:`sslpipe.data.scan`).
    """
    return dataset_spec(name).builder(root, split, transform, download, on_bad_image)


class IndexedDataset(Dataset):
    """Wrap a ``(image, label)`` dataset so items become ``(image, label, index)``.

    Methods with per-sample state (PIRL's memory bank) need the index; the others ignore it. Fetched as
    ``dataset[(index, seed)]`` (what :class:`~sslpipe.resume.ResumableSampler` yields), the item's random
    augmentation is drawn from ``seed`` alone, the caller's random stream left untouched: the same views
    whichever worker loads it, however far the loader prefetched, and again after a resume.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> tuple[Any, int, int]:
        if isinstance(key, tuple):
            index, seed = key
            with torch.random.fork_rng(devices=[]):  # torchvision's v2 transforms draw from torch's CPU stream
                torch.manual_seed(seed)
                image, label = self.base[index]
            return image, label, index
        image, label = self.base[key]
        return image, label, key


def _missing(name: str, path: str, hint: str) -> DataNotFoundError:
    return DataNotFoundError(f"{name} not found under {os.path.abspath(path)!r}. {hint}")


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
        lambda root, split, transform, download, on_bad_image: DigitsDataset(split, transform),
        mean=(0.3053, 0.3053, 0.3053),
        std=(0.3759, 0.3759, 0.3759),
        default_image_size=32,
        num_classes=10,
    )
)


# ---------------------------------------------------------------- fake (tests)
def _fake(root: str, split: Split, transform: Transform, download: bool, on_bad_image: OnBadImage) -> Dataset:
    from torchvision.datasets import FakeData

    size = 64 if split == "val" else 256
    # A different random_offset per split so val images are not the train images.
    return FakeData(
        size=size,
        image_size=(3, 32, 32),
        num_classes=10,
        transform=transform,
        random_offset=0 if split != "val" else 10_000,
    )


register_dataset(DatasetSpec("fake", _fake, (0.5, 0.5, 0.5), (0.29, 0.29, 0.29), 32, 10))


# ---------------------------------------------------------------- torchvision datasets
def _torchvision(cls_name: str, folder: str):
    def build(root: str, split: Split, transform: Transform, download: bool, on_bad_image: OnBadImage) -> Dataset:
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
    DatasetSpec(
        "cifar10",
        _torchvision("CIFAR10", "cifar-10-batches-py"),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        32,
        10,
    )
)
register_dataset(
    DatasetSpec(
        "cifar100",
        _torchvision("CIFAR100", "cifar-100-python"),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        32,
        100,
    )
)
register_dataset(
    DatasetSpec(
        "stl10", _torchvision("STL10", "stl10_binary"), (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), 96, 10
    )
)


# ---------------------------------------------------------------- folders of image files
class ImageFiles(Dataset):
    """Images read from a list of files through :func:`~sslpipe.data.images.load_rgb`, each with a label.

    A file that fails here passed the scan before training, so it changed since. With ``skip_unreadable``
    it is logged (once per worker) and replaced by the next readable file in the list, with that file's
    label; otherwise the :class:`~sslpipe.errors.DataError` names it.

    Args:
        samples: ``(path, label)`` pairs; label -1 for an image without one.
        classes: class names; ``classes[label]`` names a label (empty for unlabeled images).
        transform: applied to each RGB PIL image.
        skip_unreadable: replace a file that fails to load instead of raising.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str] = (),
        transform: Transform = None,
        skip_unreadable: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def with_transform(self, transform: Transform) -> "ImageFiles":
        """The same files with another transform (no rescan)."""
        return ImageFiles(self.samples, self.classes, transform, self.skip_unreadable)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        count = len(self.samples)
        if not -count <= index < count:  # the end of iteration for list(dataset)
            raise IndexError(f"index {index} out of range for {count} images")
        for attempt in range(count):
            path, label = self.samples[(index + attempt) % count]
            try:
                image = load_rgb(path)
            except Exception as err:  # any decoder error: the file is unreadable now
                if not self.skip_unreadable:
                    raise DataError(
                        f"cannot read {path} ({type(err).__name__}: {err}); it passed the scan before training, "
                        "so it changed since. Fix or delete it and restart (the scan rechecks changed files), or "
                        "pass --data.on_bad_image skip."
                    ) from err
                if path not in self._reported:
                    self._reported.add(path)
                    logging.getLogger(__name__).warning(
                        f"data: skipping unreadable {path} ({type(err).__name__}: {err}); using the next image"
                    )
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, label
        raise DataError(f"none of the {len(self.samples)} images can be read any more (first: {self.samples[0][0]})")


def _imagefolder(root: str, split: Split, transform: Transform, download: bool, on_bad_image: OnBadImage) -> Dataset:
    """``<root>/train`` (splits ``pretrain``, ``train``) or ``<root>/val``, labelled by train's classes.

    Class folders are those of ``<root>/train``, sorted; a class's index is its position there, for every split.
    """
    train_dir = os.path.join(root, "train")
    if split == "val":
        # One class-to-index map for both splits, from train: val indexed on its own would shift every label
        # after a class missing from val.
        classes = shared_classes(train_dir, os.path.join(root, "val"))
        folder, scanned = os.path.join(root, "val"), class_folders(os.path.join(root, "val"))
    else:
        classes = class_folders(train_dir)
        folder, scanned = train_dir, classes
    files = usable_files(scan_folder(folder, scanned), on_bad_image)
    index = {c: i for i, c in enumerate(classes)}
    samples = [(os.path.join(folder, rel), index[rel.split(os.sep, 1)[0]]) for rel in files]
    return ImageFiles(samples, classes, transform, skip_unreadable=on_bad_image == "skip")


def imagefolder_num_classes(root: str) -> int:
    """Number of class sub-folders of ``<root>/train`` (the imagefolder label space)."""
    return len(class_folders(os.path.join(root, "train")))


register_dataset(
    DatasetSpec(
        "imagefolder",
        _imagefolder,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        224,
        None,
        eval_resize_ratio=256 / 224,
    )
)


def _unlabeled(root: str, split: Split, transform: Transform, download: bool, on_bad_image: OnBadImage) -> Dataset:
    """Every image under ``root`` (recursive, any class structure ignored), label -1; only the ``pretrain`` split."""
    if split != "pretrain":
        raise DataError(
            f"data.dataset=unlabeled has no labels, so no {split!r} split for evaluation: pass --data.eval_root DIR "
            "(an ImageNet-style folder with train/ and val/ class folders)."
        )
    if not os.path.isdir(root):
        raise _missing("unlabeled image folder", root, "Set --data.root to a folder of images (searched recursively).")
    if os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val")):
        log_warning(
            f"data: {os.path.abspath(root)!r} has train/ and val/: data.dataset=unlabeled pretrains on every image "
            "under it, val/ included. Point --data.root at train/ to keep val/ held out."
        )
    files = usable_files(scan_folder(root), on_bad_image)
    samples = [(os.path.join(root, rel), -1) for rel in files]
    return ImageFiles(samples, (), transform, skip_unreadable=on_bad_image == "skip")


register_dataset(
    DatasetSpec(
        "unlabeled", _unlabeled, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, 0, eval_resize_ratio=256 / 224
    )
)
