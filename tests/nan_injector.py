"""A callback that makes the model's weights NaN from a given step on (the NaN-stop test's injected failure)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch


class PoisonAtStep(pl.Callback):
    """Before optimiser step ``step`` (0-based), fill the backbone's first weight with NaN: that step's loss is NaN."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.backbone.parameters()).fill_(float("nan"))


class PoisonBatchAtStep(pl.Callback):
    """Fill the training views of optimiser step ``step`` with NaN: only that step's loss is NaN."""

    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            for view in batch[0]:
                view.fill_(float("nan"))
