"""DataWaitMonitor against known costs: a dataset that sleeps per image and a step that sleeps a known time.

Sleeps cost wall time but no CPU, so the expected shares hold on a busy machine; the tolerance covers
Lightning's own per-step work (optimiser, hooks, logging): a few milliseconds, up to 20 ms measured on the
shared, 8-fold oversubscribed 2-core test machine, against steps of 150+ ms.
"""

from __future__ import annotations

import json
import time

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sslpipe.callbacks import RunSummary
from sslpipe.monitor import DataWaitMonitor

BATCH = 4


class SleepyImages(Dataset):
    """``length`` random vectors; each ``__getitem__`` sleeps ``seconds``."""

    def __init__(self, length: int, seconds: float) -> None:
        self.length, self.seconds = length, seconds

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        time.sleep(self.seconds)
        return torch.full((3,), float(i)), 0, i


class SleepyStep(pl.LightningModule):
    """A step that costs ``seconds`` of wall time (and a real backward and optimiser step)."""

    def __init__(self, seconds: float, val_seconds: float = 0.0) -> None:
        super().__init__()
        self.seconds, self.val_seconds = seconds, val_seconds
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(self.seconds)
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        time.sleep(self.val_seconds)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class RecordingMonitor(DataWaitMonitor):
    """Keeps every step's logged share (the monitor itself keeps only the run's totals)."""

    def __init__(self) -> None:
        super().__init__(skip_steps=1)
        self.history: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.history.append(float(trainer.callback_metrics["train/data_wait_fraction_step"]))


def _fit(load_s: float, step_s: float, steps: int = 6, val_s: float = 0.0, callbacks=()):
    monitor = RecordingMonitor()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=steps,
        val_check_interval=steps // 2 if val_s else 1.0,
        limit_val_batches=1 if val_s else 0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[monitor, *callbacks],
    )
    train = DataLoader(SleepyImages(steps * BATCH, load_s / BATCH), batch_size=BATCH, num_workers=0)
    val = DataLoader(SleepyImages(BATCH, 0.0), batch_size=BATCH) if val_s else None
    trainer.fit(SleepyStep(step_s, val_s), train, val)
    return trainer, monitor


@pytest.mark.parametrize("load_s, step_s", [(0.3, 0.1), (0.15, 0.15)])
def test_measured_share_matches_the_known_sleeps(load_s, step_s):
    trainer, monitor = _fit(load_s, step_s)
    truth = load_s / (load_s + step_s)
    assert len(monitor.history) == 6
    assert monitor.data_wait_fraction == pytest.approx(truth, abs=0.06)
    for share in monitor.history:
        assert share == pytest.approx(truth, abs=0.1)
    assert "train/data_wait_fraction_step" in trainer.progress_bar_metrics
    assert float(trainer.callback_metrics["train/data_wait_fraction_epoch"]) == pytest.approx(truth, abs=0.06)


def test_a_loader_that_never_waits_reads_near_zero_and_validation_is_not_waiting(tmp_path):
    # validation (0.5 s) runs mid-epoch after step 3: counted as waiting, step 4 would read ~0.7
    summary = RunSummary(str(tmp_path), "sleepy", "sleepy", skip_steps=1)
    _, monitor = _fit(0.0, 0.25, val_s=0.5, callbacks=[summary])
    assert monitor.data_wait_fraction == pytest.approx(0.0, abs=0.06)
    assert max(monitor.history) < 0.1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["data_wait_fraction"] == pytest.approx(monitor.data_wait_fraction)


def test_the_monitor_stamps_a_step_end_after_the_other_callbacks():
    """A callback's batch-end work (a progress bar waiting for the device, a checkpoint) is part of the step."""

    class SlowBatchEnd(pl.Callback):
        def on_train_batch_end(self, *args):
            time.sleep(0.2)

    _, monitor = _fit(0.0, 0.1, steps=4, callbacks=[SlowBatchEnd()])
    assert max(monitor.history) < 0.25  # the 0.2 s would otherwise read as 0.2 / 0.3 of waiting
