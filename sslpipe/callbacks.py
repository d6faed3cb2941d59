"""Callbacks every pretraining run gets: throughput measurement and the run's metrics.json."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only


def write_metrics(run_dir: str, metrics: dict[str, Any]) -> str:
    """Merge ``metrics`` into ``<run_dir>/metrics.json`` (created if absent) and return its path."""
    path = os.path.join(run_dir, "metrics.json")
    current: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            current = json.load(f)
    current.update(metrics)
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)
    return path


class RunSummary(pl.Callback):
    """Measures training throughput and writes ``metrics.json`` into the run directory at the end of fit.

    Throughput counts source images (not views) over all ranks, from the end of the first
    ``skip_steps`` batches (start-up, worker spawn, allocator warm-up) to the last batch, data
    loading included: it is what a user's wall clock sees.
    """

    def __init__(self, run_dir: str, method: str, dataset: str, skip_steps: int = 5) -> None:
        self.run_dir = run_dir
        self.method = method
        self.dataset = dataset
        self.skip_steps = skip_steps
        self._t0: Optional[float] = None
        self._images = 0
        self._steps = 0
        self._fit_start = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._steps += 1
        if self._steps == self.skip_steps:
            self._t0 = time.perf_counter()
        elif self._steps > self.skip_steps:
            self._images += int(batch[1].shape[0]) * trainer.world_size

    def images_per_second(self) -> Optional[float]:
        """Global training images per second measured so far (``None`` before enough steps)."""
        if self._t0 is None or self._images == 0:
            return None
        return self._images / (time.perf_counter() - self._t0)

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics

        def scalar(name: str) -> Optional[float]:
            value = metrics.get(name)
            return float(value) if isinstance(value, torch.Tensor) else value

        top1 = scalar("val/online_linear_top1")
        best = None
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "monitor", None) == "val/online_linear_top1" and cb.best_model_score is not None:
                best = float(cb.best_model_score)
        summary = {
            "method": self.method,
            "dataset": self.dataset,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "train_images_per_second": self.images_per_second(),
            "train_seconds": time.perf_counter() - self._fit_start,
            "train_loss": scalar("train/loss_epoch") or scalar("train/loss"),
            # the probe logs a share in [0, 1]; metrics.json reports percent like the offline probes
            "online_linear_top1": None if top1 is None else 100 * top1,
            "best_online_linear_top1": None if best is None else 100 * best,
        }
        for key in ("energy_pos", "energy_neg", "energy_gap"):
            value = scalar(f"train/{key}_epoch") or scalar(f"train/{key}")
            if value is not None:
                summary[key] = value
        write_metrics(self.run_dir, summary)
