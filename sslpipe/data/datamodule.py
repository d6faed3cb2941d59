"""The one LightningDataModule: multi-view batches for pretraining, labelled batches for evaluation."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from sslpipe.augment import BatchedAugment, SimCLRViews, ViewRecipe, eval_transform
from sslpipe.data.datasets import (
    ImageFiles,
    IndexedDataset,
    Split,
    build_dataset,
    dataset_spec,
    imagefolder_num_classes,
)
from sslpipe.data.scan import OnBadImage
from sslpipe.errors import ConfigError, DataError, check_positive
from sslpipe.resume import ResumableSampler, loader_position

AugmentOn = Literal["auto", "cpu", "device"]

# What ``data.augment_on: auto`` means when training on the CPU (on an accelerator auto is always ``device``).
# Chosen by measurement (2-core CPU, 2 loader workers, SimCLR ResNet-18 on a photo folder, ImageNet recipe; the
# lead's run of 2026-12-02): device 122-131 vs cpu 111-114 images/s at 64 px, 22.0 vs 14.0 at 224 px. The batched
# ops cost less per image than per-sample ones and the workers no longer compete with the step for the cores.
# Change it only with a new measurement.
CPU_AUGMENT_DEFAULT: Literal["cpu", "device"] = "device"

# Mixed into the augmentation generator's seed so its stream is not the global generator's (seeded from the same
# run seed by seed_everything): on the CPU the two would otherwise draw the same numbers.
_AUGMENT_STREAM = 0x5A17


def augment_seed(base: int, rank: int, step: int) -> int:
    """Seed of the device augmentation generator: one stream per (run seed, global rank, resumed step)."""
    return int(np.random.SeedSequence([_AUGMENT_STREAM, base % 2**63, rank, step]).generate_state(1, np.uint64)[0] >> 1)


class SSLDataModule(pl.LightningDataModule):
    """Serves ``(views, label, index)`` pretraining batches and ``(image, label)`` evaluation batches.

    Args:
        dataset: registered name: ``digits`` (default, embedded), ``cifar10``, ``cifar100``, ``stl10``,
            ``imagefolder``, ``unlabeled`` (every image under ``root``, label -1, for pretraining), ``fake``.
        root: where the dataset's files live (``imagefolder``: the folder holding ``train/`` and ``val/``).
        eval_root: ``unlabeled`` only: an ImageNet-style folder (``train/``, ``val/`` class folders) whose
            splits ``sslpipe linear|knn|kmeans`` evaluate on; without it there are no labelled splits.
        on_bad_image: folder datasets are scanned before use; ``error`` stops naming every unreadable file
            and empty class folder, ``skip`` leaves them out with a logged count (:mod:`sslpipe.data.scan`).
        image_size: side of the square crops; ``None`` takes the dataset's default.
        batch_size: per-device pretraining batch size.
        eval_batch_size: per-device batch size for validation/feature extraction (default: ``batch_size``).
        num_workers: DataLoader worker processes (0 loads in the main process).
        pin_memory: ``None`` pins when CUDA is available.
        persistent_workers: keep workers alive between epochs (ignored when ``num_workers`` is 0).
        download: let torchvision download CIFAR/STL (needs network).
        views: the training-view recipe (default: two SimCLR views).
        augment_on: where the views' photometric ops run. ``cpu``: the whole recipe per sample in the loader
            workers, float views leave them. ``device``: workers decode, crop and flip to uint8 (4x less to copy);
            colour jitter, grayscale, blur, solarisation and normalisation run over the whole batch on the
            training device after the transfer, parameters drawn per sample from a generator seeded by the run
            seed and the global rank (its state is saved in checkpoints). ``auto``: ``device`` on an accelerator,
            :data:`CPU_AUGMENT_DEFAULT` on the CPU. Validation and feature extraction are unaffected: their
            deterministic transform stays in the workers.
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str = "data",
        eval_root: Optional[str] = None,
        on_bad_image: OnBadImage = "error",
        image_size: Optional[int] = None,
        batch_size: int = 256,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 2,
        pin_memory: Optional[bool] = None,
        persistent_workers: bool = True,
        download: bool = False,
        views: Optional[ViewRecipe] = None,
        augment_on: AugmentOn = "auto",
    ) -> None:
        super().__init__()
        self.spec = dataset_spec(dataset)
        check_positive("data.batch_size", batch_size)
        if image_size is not None:
            check_positive("data.image_size", image_size)
        if eval_batch_size is not None:
            check_positive("data.eval_batch_size", eval_batch_size)
        if num_workers < 0:
            raise ConfigError(
                f"data.num_workers={num_workers} is invalid: it must be >= 0 (0 loads in the main process)"
            )
        self.save_hyperparameters(ignore=["views"])
        self.dataset = dataset
        self.root = root
        if eval_root is not None and self.spec.num_classes != 0:
            raise ConfigError(
                f"data.eval_root is for data.dataset unlabeled; {dataset!r} has its own train and val splits. "
                "Drop --data.eval_root (or pass --data.eval_root null)."
            )
        if on_bad_image not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.eval_root = eval_root
        self.on_bad_image = on_bad_image
        self.image_size = image_size or self.spec.default_image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.download = download
        self.views = views if views is not None else SimCLRViews()
        if augment_on not in ("auto", "cpu", "device"):
            raise ConfigError(f"data.augment_on must be auto, cpu or device, got {augment_on!r}")
        self.augment_on = augment_on
        self._datasets: dict[str, Dataset] = {}
        # Set when the pretraining set is built: its device half (device mode only), used by on_after_batch_transfer.
        self._batched: Optional[BatchedAugment] = None
        self._generator: Optional[torch.Generator] = None
        self._restored_generator: Optional[dict[str, Any]] = None
        self._resume_position: dict[str, int] = {"epoch": 0, "batches": 0}

    # ------------------------------------------------------------ facts about the data
    @property
    def num_classes(self) -> int:
        """Classes of the labelled ``train``/``val`` splits (read from the class folders for ``imagefolder`` and
        ``eval_root``); 0 when there are none (``unlabeled`` without ``eval_root``)."""
        if self.eval_root is not None:
            return imagefolder_num_classes(self.eval_root)
        if self.spec.num_classes is not None:
            return self.spec.num_classes
        return imagefolder_num_classes(self.root)

    @property
    def pretrain_num_classes(self) -> int:
        """Classes the pretraining images are labelled with: the online probe's label space, linked to
        ``model.num_classes``. 0 for ``unlabeled`` (eval_root or not): no labels to train a probe on."""
        return 0 if self.spec.num_classes == 0 else self.num_classes

    @property
    def labelled_root(self) -> str:
        """The folder the labelled ``train``/``val`` splits are read from."""
        return self.eval_root if self.eval_root is not None else self.root

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

    def resolved_augment_on(self) -> Literal["cpu", "device"]:
        """``augment_on`` with ``auto`` resolved: ``device`` on an accelerator, :data:`CPU_AUGMENT_DEFAULT` on the CPU
        (without a trainer: on the CPU unless CUDA is available)."""
        if self.augment_on != "auto":
            return self.augment_on
        trainer = self.trainer
        on_cpu = (
            isinstance(trainer.accelerator, CPUAccelerator) if trainer is not None else not torch.cuda.is_available()
        )
        return CPU_AUGMENT_DEFAULT if on_cpu else "device"

    def train_transform(self):
        """The per-image worker transform built from ``views`` for this dataset's size and statistics: the whole
        recipe (``augment_on`` cpu) or its uint8 geometric half (device; :meth:`device_views` does the rest)."""
        mode = self.resolved_augment_on()
        if mode == "device":
            try:
                transform = self.views.build_geometric(self.image_size)
                self._batched = self.views.build_batched(self.image_size, self.mean, self.std)
            except NotImplementedError as err:
                if self.augment_on == "device":
                    raise ConfigError(
                        f"data.views {type(self.views).__name__} has no device half ({err}); "
                        "use --data.augment_on cpu (or auto)"
                    ) from err
                rank_zero_info(f"data.augment_on auto: {type(self.views).__name__} runs per sample on the CPU ({err})")
                mode = "cpu"
        if mode == "cpu":
            self._batched = None
            transform = self.views.build(self.image_size, self.mean, self.std)
        return transform

    # ------------------------------------------------------------ device augmentation
    def augment_generator(self, device: torch.device) -> torch.Generator:
        """The generator the device half draws from, made on first use on ``device``: seeded from the run seed
        (``seed_everything``'s, else torch's initial seed), the global rank and the step a resumed run starts at,
        or, resuming a single-process run on the same kind of device, the state saved in the checkpoint."""
        if self._generator is not None and self._generator.device == device:
            return self._generator
        trainer = self.trainer
        rank, world, step = (trainer.global_rank, trainer.world_size, trainer.global_step) if trainer else (0, 1, 0)
        generator = torch.Generator(device=device)
        saved = self._restored_generator
        if saved is not None and saved["world_size"] == world == 1 and saved["device_type"] == device.type:
            generator.set_state(saved["state"])
        else:  # several ranks: rank 0's saved state would give every rank the same stream; derive each one's
            generator.manual_seed(augment_seed(int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())), rank, step))
        self._restored_generator = None
        self._generator = generator
        return generator

    def device_views(self, views: Any) -> Any:
        """The training views the model sees, from what the loader gave (already on the device): the batched
        photometric half applied in ``device`` mode, unchanged in ``cpu`` mode."""
        if self._batched is None:
            return views
        first = views[0]
        return self._batched(views, self.augment_generator(first.device))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches in ``device`` mode: the photometric half on the device, cast to the trainer's input
        precision (Lightning casts inputs before the transfer, when the views were still uint8)."""
        trainer = self.trainer
        if self._batched is None or trainer is None or not trainer.training:
            return batch  # validation / feature batches: the eval transform already normalised them
        views, labels, indices = batch
        views = trainer.precision_plugin.convert_input(self.device_views(views))
        return views, labels, indices

    def state_dict(self) -> dict[str, Any]:
        """What Lightning stores in checkpoints: the loader position (epoch, batches trained on) for an exact
        mid-epoch resume (:mod:`sslpipe.resume`) and the device augmentation generator's state."""
        trainer = self.trainer
        state: dict[str, Any] = {}
        if getattr(trainer, "fit_loop", None) is not None:  # a trainer fitting (not a stand-in in a unit test)
            state.update(loader_position(trainer))
        if self._generator is not None:
            state["augment_generator"] = {
                "state": self._generator.get_state(),
                "device_type": self._generator.device.type,
                "world_size": trainer.world_size if trainer is not None else 1,
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training loader where the checkpoint left it (applied by :meth:`train_dataloader`); keep the
        saved generator state for :meth:`augment_generator` (the device is known at the first batch)."""
        if "epoch" in state_dict:
            self._resume_position = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}
        self._restored_generator = state_dict.get("augment_generator")
        self._generator = None

    # ------------------------------------------------------------ datasets
    def _fit_splits(self) -> list[Split]:
        # No online probe (unlabeled pretraining images): nothing to validate.
        return ["pretrain", "val"] if self.pretrain_num_classes > 0 else ["pretrain"]

    def prepare_data(self) -> None:
        """Download (when ``download`` is set) and scan folder datasets, once per node before the other ranks
        start (Lightning calls this on local rank 0): the others then read the scan from its cache."""
        if self.download:
            for split in ("pretrain", "val"):
                build_dataset(self.dataset, self.root, split, None, download=True)
        problems: list[DataError] = []
        for split in self._fit_splits():  # every split checked, all problems reported together
            try:
                self.split_dataset(split)
            except DataError as err:
                problems.append(err)
        if len(problems) == 1:
            raise problems[0]
        if problems:
            raise DataError("\n".join(str(err) for err in problems))

    def get_dataset(self, split: Split, transform: Any) -> Dataset:
        """Build ``split`` with ``transform`` (uncached; :meth:`split_dataset` keeps one per split)."""
        if split != "pretrain" and self.eval_root is not None:
            return build_dataset("imagefolder", self.eval_root, split, transform, on_bad_image=self.on_bad_image)
        return build_dataset(self.dataset, self.root, split, transform, download=False, on_bad_image=self.on_bad_image)

    def split_dataset(self, split: Split) -> Dataset:
        """``split``, built once: ``pretrain`` with the training views (items ``(views, label, index)``),
        ``train``/``val`` with the eval transform (items ``(image, label)``)."""
        if split not in self._datasets:
            if split == "pretrain":
                self._datasets[split] = IndexedDataset(self.get_dataset(split, self.train_transform()))
            else:
                self._datasets[split] = self.get_dataset(split, self.eval_transform())
        return self._datasets[split]

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the pretraining set (for ``fit``) and the validation set, unless there is no online probe."""
        for split in self._fit_splits():
            if split == "val" or stage in (None, "fit"):
                self.split_dataset(split)

    @property
    def num_train_samples(self) -> int:
        """Number of pretraining images (PIRL's memory bank has one slot per image)."""
        return len(self.split_dataset("pretrain"))  # type: ignore[arg-type]

    def preview_dataset(self) -> Dataset:
        """Fixed images for visual callbacks (reconstructions), ``(image, label)`` with the eval transform: the
        labelled val split, or the pretraining images when there is none (``unlabeled`` without ``eval_root``)."""
        if self.num_classes > 0:
            return self.split_dataset("val")
        pretrain = self.split_dataset("pretrain").base  # type: ignore[attr-defined]
        assert isinstance(pretrain, ImageFiles), "only unlabeled data has no val split"
        return pretrain.with_transform(self.eval_transform())

    # ------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, batch_size: int, sampler: Optional[ResumableSampler] = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=sampler is not None,  # equal per-rank batches keep gathered negatives and queues aligned
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            # Worker seeds from a private generator: creating an iterator leaves the global stream alone.
            generator=torch.Generator().manual_seed(self.seed),
        )

    @property
    def seed(self) -> int:
        """The run's seed (``seed_everything``), which orders each epoch and seeds each sample's augmentation."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def train_dataloader(self) -> DataLoader:
        """Shuffled multi-view batches from a :class:`~sslpipe.resume.ResumableSampler` (this rank's share under
        DDP), starting where a resumed checkpoint stopped."""
        dataset = self.split_dataset("pretrain")
        if len(dataset) < self.batch_size:  # type: ignore[arg-type]
            raise ConfigError(
                f"data.batch_size={self.batch_size} exceeds the {len(dataset)} pretraining images of "  # type: ignore[arg-type]
                f"{self.dataset!r}; lower --data.batch_size"
            )
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        position = self._resume_position
        sampler = ResumableSampler(
            dataset, replicas, rank, self.seed, position["epoch"], position["batches"] * self.batch_size
        )
        return self._loader(dataset, self.batch_size, sampler)

    def val_dataloader(self) -> Union[DataLoader, list]:
        """Labelled validation batches for the online probe; none (``[]``: Lightning skips validation) when the
        pretraining images have no labels, so there is no probe."""
        if "val" not in self._fit_splits():
            return []
        return self._loader(self.split_dataset("val"), self.eval_batch_size)

    def eval_dataloader(self, split: Split) -> DataLoader:
        """Labelled, unshuffled batches of ``split`` with the eval transform (feature extraction)."""
        return self._loader(self.split_dataset(split), self.eval_batch_size)
