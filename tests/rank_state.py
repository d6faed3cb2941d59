"""A callback for the DDP CLI tests (``--trainer.callbacks tests.rank_state.DumpRankState``)."""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch


class DumpRankState(pl.Callback):
    """Saves each rank's copy of the buffers every rank updates on its own, at the end of training.

    Writes ``<run dir>/state_rank<r>.pt``; the test checks that queues and memory banks end identical.
    """

    NAMES = ("queue.queue", "queue.ptr", "key_encoder.num_updates", "memory.bank", "nce_log_z")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == 0:  # after the module's on_train_start has derived the rank's random stream
            self.seed = torch.initial_seed()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if k in self.NAMES}
        state["seed"] = self.seed
        state["ddp_ignored"] = sorted(getattr(trainer.strategy.model, "parameters_to_ignore", ()))
        torch.save(state, os.path.join(trainer.default_root_dir, f"state_rank{trainer.global_rank}.pt"))
