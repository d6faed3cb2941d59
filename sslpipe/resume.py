"""Exact resumption: a resumed run continues with the same batches, augmentations and random draws.

Three things make step ``k+1`` of a resumed run equal to step ``k+1`` of an uninterrupted one (on the CPU, same
seed), beyond the weights, optimiser, scheduler, queue, bank and momentum-encoder state Lightning restores:

* **the loader position.** :class:`ResumableSampler` draws epoch ``e``'s order from ``seed + e`` (as
  ``DistributedSampler`` does, so Lightning leaves it alone under DDP) and starts ``start`` samples into it; the
  DataModule stores ``(epoch, batches done)`` in the checkpoint and builds the sampler from it on resume.
* **the augmentations.** Each sample's random crop/jitter is drawn from its own seed ``f(seed, epoch, index)``
  (:func:`sample_seed`, applied by :class:`~sslpipe.data.datasets.IndexedDataset` under ``fork_rng``), so it
  does not depend on which worker loads it, on how many batches were prefetched, or on the process's stream.
* **the global random streams** (torch CPU and CUDA, numpy, Python: shuffle-BN permutations, bank negatives,
  masks) at the checkpoint (:func:`collect_rng_states`), restored when training starts (:func:`set_rng_states`).

Checkpoints stay loadable with ``torch.load(weights_only=True)``: the states are tensors and plain lists.
"""

from __future__ import annotations

import glob
import os
import random
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant: consecutive (epoch, index) pairs get unrelated seeds


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch``: a fixed function, whoever loads it and when."""
    return (((seed * _MIX + epoch) % 2**64) * _MIX + index) % 2**63


class ResumableSampler(DistributedSampler):
    """Shuffled ``(index, augmentation seed)`` pairs for this rank, optionally starting part-way into an epoch.

    Args:
        dataset: the map-style dataset (its items are fetched as ``dataset[(index, seed)]``).
        num_replicas: ranks sharing the data (1 without DDP).
        rank: this rank.
        seed: the run's seed; epoch ``e``'s permutation is ``randperm`` from ``seed + e``.
        epoch: the first epoch this sampler serves (Lightning calls :meth:`set_epoch` each epoch after that).
        start: samples of this rank to skip in ``epoch`` (the batches a checkpoint has already trained on), once.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, epoch: int = 0, start: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.epoch = epoch
        self.start_epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())
        skip = self.start if self.epoch == self.start_epoch else 0
        self.start = 0  # only the first pass over the resumed epoch skips
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices[skip:]])


def loader_position(trainer: Any) -> dict[str, int]:
    """``{"epoch", "batches"}``: the epoch in progress and its batches already trained on (after the last optimiser
    step), read from Lightning's loop counters; an epoch whose last batch is done counts as the next epoch's start."""
    loop = trainer.fit_loop
    epoch = int(loop.epoch_progress.current.processed)
    done = int(loop.epoch_loop.batch_progress.current.processed)
    total = trainer.num_training_batches
    if isinstance(total, (int, float)) and total != float("inf") and done >= total:
        epoch, done = epoch + 1, 0
    return {"epoch": epoch, "batches": done}


# ---------------------------------------------------------------------------------------------- random streams
def collect_rng_states() -> dict[str, Any]:
    """The global random states of torch (CPU and every CUDA device), numpy and Python, as tensors and lists
    (so ``torch.load(weights_only=True)`` reads them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(state), python_gauss],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`collect_rng_states` returned (CUDA states only when the device count matches)."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("torch.cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, python_gauss = states["python"]
    random.setstate((version, tuple(state), python_gauss))


# ---------------------------------------------------------------------------------------------- finding checkpoints
def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest checkpoint of the run in ``run_dir`` (``checkpoints/*.ckpt`` and Lightning's SLURM
    ``hpc_ckpt_*.ckpt``, by modification time), or ``None``."""
    paths = glob.glob(os.path.join(run_dir, "checkpoints", "*.ckpt")) + glob.glob(
        os.path.join(run_dir, "hpc_ckpt_*.ckpt")
    )
    return max(paths, key=os.path.getmtime) if paths else None
