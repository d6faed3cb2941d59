"""How contrastive encoders see BatchNorm statistics: whole batch, split into emulated devices, shuffled, or synced.

BatchNorm leaks "these images were normalised together": with a momentum key encoder the positive key is
the only current-batch key among MoCo v2's logits, and the model can find it by its batch statistics
instead of its content. The remedies of the MoCo papers, in one place:

* **shuffle-BN**: keys are computed on a batch shuffled across ranks and un-shuffled afterwards, so a
  key's statistics come from a random subset of images, not the subset its query was normalised with;
* **split-BN**: on one device, every encoder normalises ``splits`` sub-batches separately, emulating
  that many devices (the official MoCo CIFAR demo); with shuffle-BN the key sub-batches are drawn after
  a random permutation;
* **SyncBN**: statistics over all ranks (MoCo v3's choice); it excludes shuffle-BN (nothing to shuffle).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sslpipe.distributed import batch_shuffle, batch_unshuffle

Encoder = Callable[[torch.Tensor], torch.Tensor]


class BatchNormPolicy:
    """Split-BN and shuffle-BN for a method's encoders, with the checks their settings need.

    Args:
        splits: sub-batches each encoder normalises separately (1 = the whole local batch).
        shuffle: shuffle key batches across ranks (and, with ``splits > 1``, within the rank) first.
        sync: BatchNorm statistics are synchronised across ranks (SyncBatchNorm), which excludes ``shuffle``.
    """

    def __init__(self, splits: int = 1, shuffle: bool = False, sync: bool = False) -> None:
        if splits < 1:
            raise ValueError(f"bn_splits must be >= 1, got {splits}")
        if shuffle and sync:
            raise ValueError(
                "shuffle_bn and sync_bn exclude each other (synced statistics need no shuffling); set one to false"
            )
        self.splits, self.shuffle, self.sync = splits, shuffle, sync

    def check_batch(self, batch_size: int) -> None:
        """Reject a batch that does not split into ``splits`` equal BatchNorm groups."""
        if batch_size % self.splits:
            raise ValueError(
                f"the batch of {batch_size} images does not split into model.bn_splits={self.splits} equal "
                "BatchNorm groups; choose a bn_splits that divides data.batch_size"
            )

    def split(self, encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
        """``encoder`` over ``splits`` sub-batches of ``x``, so BatchNorm sees each alone (emulated devices)."""
        return encoder(x) if self.splits == 1 else torch.cat([encoder(chunk) for chunk in x.chunk(self.splits)])

    @torch.no_grad()
    def keys(self, encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
        """Key-encoder outputs for ``x`` in input order: shuffled first when ``shuffle``, always split."""
        if not self.shuffle:
            return self.split(encoder, x)
        shuffled, undo = batch_shuffle(x)
        return batch_unshuffle(self.split(encoder, shuffled), undo)

    def validate_modules(self, *modules: nn.Module) -> None:
        """Reject shuffle-BN when the modules hold SyncBatchNorm (``trainer.sync_batchnorm`` converted them)."""
        if self.shuffle and any(isinstance(m, nn.SyncBatchNorm) for module in modules for m in module.modules()):
            raise ValueError(
                "trainer.sync_batchnorm=true with model.shuffle_bn=true: use one "
                "(model.sync_bn replaces the trainer flag)"
            )
