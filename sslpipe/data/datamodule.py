"""The one LightningDataModule: multi-view batches for pretraining, labelled batches for evaluation."""

from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from sslpipe.augment import SimCLRViews, ViewRecipe, eval_transform
from sslpipe.data.datasets import IndexedDataset, Split, build_dataset, dataset_spec, imagefolder_num_classes


class SSLDataModule(pl.LightningDataModule):
    """Serves ``(views, label, index)`` pretraining batches and ``(image, label)`` evaluation batches.

    Args:
        dataset: registered name: ``digits`` (default, embedded), ``cifar10``, ``cifar100``, ``stl10``,
            ``imagefolder``, ``fake``.
        root: where the dataset's files live (``imagefolder``: the folder holding ``train/`` and ``val/``).
        image_size: side of the square crops; ``None`` takes the dataset's default.
        batch_size: per-device pretraining batch size.
        eval_batch_size: per-device batch size for validation/feature extraction (default: ``batch_size``).
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: ``None`` pins when CUDA is available.
        persistent_workers: keep workers alive between epochs (ignored when ``num_workers`` is 0).
        download: let torchvision download CIFAR/STL (needs network).
        views: the training-view recipe (default: two SimCLR views).
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str = "data",
        image_size: Optional[int] = None,
        batch_size: int = 256,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 2,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        download: bool = False,
        views: Optional[ViewRecipe] = None,
    ) -> None:
        super().__init__()
        self.spec = dataset_spec(dataset)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters(ignore=["views"])
        self.dataset = dataset
        self.root = root
        self.image_size = image_size or self.spec.default_image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.download = download
        self.views = views if views is not None else SimCLRViews()
        self._datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------ facts about the data
    @property
    def num_classes(self) -> int:
        """Size of the label space (read from the folders for ``imagefolder``)."""
        if self.spec.num_classes is not None:
            return self.spec.num_classes
        return imagefolder_num_classes(self.root)

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel normalisation mean of this dataset."""
        return self.spec.mean

    @property
    def std(self) -> tuple[float, float, float]:
        """Per-channel normalisation standard deviation of this dataset."""
        return self.spec.std

    def eval_transform(self):
        """The deterministic transform used for validation and feature extraction."""
        return eval_transform(self.image_size, self.mean, self.std, self.spec.eval_resize_ratio)

    def train_transform(self):
        """The training-view transform built from ``views`` for this dataset's size and statistics."""
        return self.views.build(self.image_size, self.mean, self.std)

    # ------------------------------------------------------------ datasets
    def prepare_data(self) -> None:
        """Download once per node when ``download`` is set (Lightning calls this on one process)."""
        if self.download:
            for split in ("pretrain", "val"):
                build_dataset(self.dataset, self.root, split, None, download=True)

    def get_dataset(self, split: Split, transform: Any) -> Dataset:
        """Build ``split`` with ``transform`` (no caching: transforms differ between uses)."""
        return build_dataset(self.dataset, self.root, split, transform, download=False)

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the pretraining set (with training views) and the validation set (eval transform)."""
        if "pretrain" not in self._datasets and stage in (None, "fit"):
            self._datasets["pretrain"] = IndexedDataset(self.get_dataset("pretrain", self.train_transform()))
        if "val" not in self._datasets:
            self._datasets["val"] = self.get_dataset("val", self.eval_transform())

    @property
    def num_train_samples(self) -> int:
        """Number of pretraining images (PIRL's memory bank has one slot per image)."""
        if "pretrain" not in self._datasets:
            self._datasets["pretrain"] = IndexedDataset(self.get_dataset("pretrain", self.train_transform()))
        return len(self._datasets["pretrain"])  # type: ignore[arg-type]

    # ------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,  # equal per-rank batches keep gathered negatives and queues aligned
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled multi-view batches; Lightning adds a DistributedSampler under DDP."""
        dataset = self._datasets["pretrain"]
        if len(dataset) < self.batch_size:  # type: ignore[arg-type]
            raise ValueError(
                f"data.batch_size={self.batch_size} exceeds the {len(dataset)} pretraining images of "  # type: ignore[arg-type]
                f"{self.dataset!r}; lower --data.batch_size"
            )
        return self._loader(dataset, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        """Labelled validation batches for the online probe."""
        return self._loader(self._datasets["val"], self.eval_batch_size, train=False)

    def eval_dataloader(self, split: Split) -> DataLoader:
        """Labelled, unshuffled batches of ``split`` with the eval transform (feature extraction)."""
        return self._loader(self.get_dataset(split, self.eval_transform()), self.eval_batch_size, train=False)
