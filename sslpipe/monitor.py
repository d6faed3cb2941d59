"""How much of each training step the host spends waiting for the data loader.

Where the wait sits in Lightning 2.6's training loop (``_TrainingEpochLoop.advance``): ``next(data_fetcher)``
fetches batch ``i`` (for a loader with a length, ``_PrefetchDataFetcher`` does not prefetch: the ``next``
call is the loader's own ``next``, which blocks until a worker has the batch ready, or loads it in the main
process when ``num_workers=0``), the batch is moved to the device (``on_before_batch_transfer``,
``batch_to_device``, ``on_after_batch_transfer``), then ``on_train_batch_start`` runs, the step runs, and
``on_train_batch_end`` closes it; step metrics go to the loggers before the next ``next``. So the host wall
time from the end of step ``i - 1`` to the start of step ``i`` is the wait for batch ``i``, plus its transfer
and any ``on_after_batch_transfer`` work (device-side augmentation), plus the loggers' write every
``log_every_n_steps``. The first step of an epoch is timed from ``on_train_epoch_start`` (epoch 0's loader
iterator was created before that, with the workers' start-up); time spent in validation is not counted.

On a GPU the host measures its own view, without adding a synchronisation: a step's host time is when its
kernels were queued, unless something in the step waits for the device. Lightning's progress bar does, once
per refresh (it reads the logged loss), so the monitor stamps the end of a step after every other callback's
``on_train_batch_end`` (it moves itself to the end of the callback list): the host then has waited for the
step's kernels, and the gap that follows is time the device sat idle for want of data. Without such a wait
the host runs ahead of the device, and the measured wait is an upper bound on the device's idle time: a
loader wait the device's backlog covers costs nothing. A share near 0 always means the loader is not the
bottleneck.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import pytorch_lightning as pl
import torch


class DataWaitMonitor(pl.Callback):
    """Logs ``train/data_wait_fraction``: per step, ``wait / (wait + step)`` in host wall time (progress bar too).

    ``wait`` is the time from the end of the previous step (or the start of the epoch) to the start of this
    one, ``step`` from the start of this step to its end (see the module docstring for what each contains).
    The value is logged as a CPU tensor, so logging it copies nothing to the device.

    Args:
        skip_steps: steps left out of the run's mean :attr:`data_wait_fraction` (start-up: allocator warm-up,
            cuDNN autotuning, ``torch.compile``), as the run's throughput leaves them out.
    """

    def __init__(self, skip_steps: int = 5) -> None:
        if skip_steps < 0:
            raise ValueError(f"skip_steps must be >= 0, got {skip_steps}")
        self.skip_steps = skip_steps
        self._since: Optional[float] = None  # end of the previous step, the epoch start, or a validation run
        self._wait = 0.0
        self._start = 0.0
        self._steps = 0
        self._total_wait = 0.0
        self._total_time = 0.0

    @property
    def data_wait_fraction(self) -> Optional[float]:
        """The run's share of step time spent waiting (total wait over total time after ``skip_steps``)."""
        return self._total_wait / self._total_time if self._total_time > 0 else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Last in the list: a step ends after the other callbacks' batch-end work (the progress bar's
        # device sync, step-interval checkpoints), which must not count as waiting for data. A new list, as
        # Lightning itself assigns: the hook loop calling this iterates over the old one.
        trainer.callbacks = [c for c in trainer.callbacks if c is not self] + [self]

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = time.perf_counter()  # inside fit, training resumes from here

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()
        self._wait = self._start - self._since if self._since is not None else 0.0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        end = time.perf_counter()
        step = end - self._start
        self._since = end
        self._steps += 1
        if self._steps > self.skip_steps:
            self._total_wait += self._wait
            self._total_time += self._wait + step
        fraction = self._wait / (self._wait + step) if self._wait + step > 0 else 0.0
        pl_module.log(
            "train/data_wait_fraction", torch.tensor(fraction), on_step=True, on_epoch=True, prog_bar=True, batch_size=1
        )
