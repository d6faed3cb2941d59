"""Callbacks every pretraining run gets: throughput and the run's metrics.json, representation diagnostics,
checkpoints that are never written from a non-finite state, the non-finite-loss stop, a checkpoint on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any, Literal, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn

from sslpipe.checkpoints import nonfinite_names
from sslpipe.errors import UserError
from sslpipe.monitor import DataWaitMonitor


def strict_json(value: Any) -> Any:
    """``value`` with every NaN/inf float (nested in dicts and lists) replaced by ``None``: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_metrics(run_dir: str, metrics: dict[str, Any]) -> str:
    """Merge ``metrics`` into ``<run_dir>/metrics.json`` (created if absent) and return its path.

    The file is strict JSON (non-finite numbers become ``null``), readable by any JSON parser.
    """
    path = os.path.join(run_dir, "metrics.json")
    current: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            current = json.load(f)  # Python's reader accepts a NaN an older sslpipe wrote; it is nulled below
    current.update(metrics)
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(strict_json(current), f, indent=2, sort_keys=True, allow_nan=False)
    return path


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite (``run.on_nan stop``)."""


class NonFiniteGuard(pl.Callback):
    """Stops the run at a non-finite training loss, without a host sync per step.

    Each step adds ``not isfinite(loss)`` to a counter on the device and keeps the first such step there; the
    host reads them every ``trainer.log_every_n_steps`` steps (when logging syncs anyway), at the end of each
    epoch and before every checkpoint (:meth:`check`), so a non-finite state is never saved over a good one.
    The error names the first bad step and the last checkpoint written from a finite state.

    Args:
        on_nan: ``stop`` (default) or ``skip`` (the method skips such steps' update itself; see ``run.on_nan``).
    """

    def __init__(self, on_nan: str = "stop") -> None:
        self.on_nan = on_nan
        self._bad: Optional[torch.Tensor] = None
        self._first: Optional[torch.Tensor] = None
        self.last_good: Optional[tuple[str, int]] = None  # (path, step) of the last checkpoint from a finite state

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.on_nan = self.on_nan  # type: ignore[assignment]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):  # a skipped step (run.on_nan skip) returned None
            return
        bad = ~torch.isfinite(loss.detach())
        if self._bad is None:
            self._bad = torch.zeros((), dtype=torch.long, device=loss.device)
            self._first = torch.full((), -1, dtype=torch.long, device=loss.device)
        # global_step is already this step's count + 1 after the optimiser step: the bad step is the one before.
        step = trainer.global_step - 1 if trainer.global_step > 0 else 0
        self._first = torch.where(bad & (self._first < 0), step, self._first)
        self._bad = self._bad + bad.long()
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def check_state(self, trainer: pl.Trainer) -> None:
        """Raise :class:`NonFiniteLossError` if any parameter or buffer is non-finite (before a checkpoint is saved:
        also catches what a finite loss hides, e.g. a queue or memory bank filled from a non-finite batch)."""
        module = trainer.lightning_module
        bad = nonfinite_names([*module.named_parameters(), *module.named_buffers()])
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise NonFiniteLossError(
                f"non-finite (NaN/inf) values in {', '.join(bad[:3])}{more} at step {trainer.global_step}; stopped "
                f"without saving; {self._last_good(trainer)}"
            )

    def _last_good(self, trainer: pl.Trainer) -> str:
        if self.last_good is not None:
            return f"the last good checkpoint is {self.last_good[0]} (step {self.last_good[1]})"
        last = os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
        return f"the last good checkpoint is {last}" if os.path.exists(last) else "no checkpoint was written yet"

    def check(self, trainer: pl.Trainer) -> None:
        """Raise :class:`NonFiniteLossError` if any step so far had a non-finite loss (one host sync)."""
        if self._bad is None or int(self._bad) == 0:
            return
        good = self._last_good(trainer)
        raise NonFiniteLossError(
            f"training loss became non-finite (NaN/inf) at step {int(self._first)} ({int(self._bad)} such steps); "
            f"stopped without saving; {good}: resume from it with --ckpt_path and a lower model.base_lr (or longer "
            "warm-up), or set --run.on_nan skip to skip such steps"
        )


def _guard(trainer: pl.Trainer) -> Optional[NonFiniteGuard]:
    return next((cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard)), None)


def save_checkpoint_checked(trainer: pl.Trainer, filepath: str, save: Any = None) -> None:
    """Save a checkpoint to ``filepath`` only from a finite state: the :class:`NonFiniteGuard` checks first (and
    raises), so a non-finite model never overwrites the last good checkpoint. ``save(trainer, filepath)`` writes
    it (default: ``trainer.save_checkpoint``)."""
    guard = _guard(trainer)
    if guard is not None:
        guard.check(trainer)
        guard.check_state(trainer)
    (save or (lambda t, path: t.save_checkpoint(path)))(trainer, filepath)
    if guard is not None:
        guard.last_good = (filepath, trainer.global_step)


class GuardedCheckpoint(ModelCheckpoint):
    """:class:`ModelCheckpoint` whose every write goes through :func:`save_checkpoint_checked`."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        save_checkpoint_checked(trainer, filepath, super()._save_checkpoint)


class Interrupted(UserError):
    """The run was stopped by a signal after saving a checkpoint; the CLI exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class SaveOnInterrupt(pl.Callback):
    """On SIGTERM or SIGINT: finish the current step, save ``checkpoints/last.ckpt``, write ``metrics.json`` so far.

    Lightning turns SIGTERM into an exception at the end of the running batch (``SIGTERMException``); SIGINT is
    made to do the same (a second Ctrl+C interrupts at once). The checkpoint then holds a consistent state: the
    step done, the loader position after it. :func:`sslpipe.pretrain.main` re-raises it as :class:`Interrupted`
    so the process exits non-zero (128 + signal number, as a shell reports a signal).
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.signal: Optional[int] = None
        self.saved: Optional[str] = None
        self._previous_sigint: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigint(signum: int, frame: Any) -> None:
            self.signal = signal.SIGINT
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl+C stops at once
            trainer._signal_connector.received_sigterm = True  # stop at the end of this batch, like SIGTERM

        self._previous_sigint = signal.signal(signal.SIGINT, on_sigint)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exception, NonFiniteLossError):
            _write_summary(trainer, "stopped: non-finite loss")
            return
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        if self.signal is None:
            self.signal = signal.SIGINT if isinstance(exception, KeyboardInterrupt) else signal.SIGTERM
        if trainer.global_step > 0 and not isinstance(exception, KeyboardInterrupt):
            path = os.path.join(self.run_dir, "checkpoints", "last.ckpt")
            save_checkpoint_checked(trainer, path)
            self.saved = path
        _write_summary(trainer, f"interrupted by {signal.Signals(self.signal).name}")
        for logger in trainer.loggers:
            logger.save()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None


def _write_summary(trainer: pl.Trainer, status: str) -> None:
    for cb in trainer.callbacks:
        if isinstance(cb, RunSummary):
            cb.write(trainer, status)


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

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
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

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, "finished")

    @rank_zero_only
    def write(self, trainer: pl.Trainer, status: str) -> None:
        """Write the run's summary into ``metrics.json`` (at the end of fit, or when it stops early)."""
        metrics = trainer.callback_metrics
        pl_module = trainer.lightning_module

        def scalar(name: str) -> Optional[float]:
            value = metrics.get(name)
            return float(value) if isinstance(value, torch.Tensor) else value

        top1 = scalar("val/online_linear_top1")
        best = None
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "monitor", None) == "val/online_linear_top1" and cb.best_model_score is not None:
                best = float(cb.best_model_score)
        summary = {
            "status": status,
            "skipped_nonfinite_steps": getattr(pl_module, "skipped_steps", 0),
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
        for cb in trainer.callbacks:
            if isinstance(cb, DataWaitMonitor) and cb.data_wait_fraction is not None:
                summary["data_wait_fraction"] = cb.data_wait_fraction
        for key in ("energy_pos", "energy_neg", "energy_gap"):
            value = scalar(f"train/{key}_epoch") or scalar(f"train/{key}")
            if value is not None:
                summary[key] = value
        write_metrics(self.run_dir, summary)


class ReconstructionLogger(pl.Callback):
    """Every ``every_n_epochs`` (and after the last epoch) save a grid of a fixed validation batch:
    row 1 the input, row 2 the masked/corrupted input, row 3 the reconstruction.

    Written to ``<run dir>/reconstructions/epoch_XXX.png`` and sent to W&B / TensorBoard when those
    loggers are attached. The module must provide ``reconstruct(images, generator) -> (corrupted,
    reconstruction)`` in the input's normalisation; the grid is un-normalised with the datamodule's
    ``mean``/``std``. A fixed seed keeps the same masks/noise every epoch so grids are comparable.
    """

    def __init__(self, every_n_epochs: int = 10, num_images: int = 8, seed: int = 0) -> None:
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError(f"every_n_epochs and num_images must be >= 1, got {every_n_epochs} and {num_images}")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.seed = seed
        self._images: Optional[torch.Tensor] = None

    def _fixed_batch(self, trainer: pl.Trainer) -> Optional[torch.Tensor]:
        if self._images is None:
            # Index the dataset directly: no loader workers spawned for eight images. The datamodule's preview
            # set is val, or the pretraining images of unlabeled data (no val split).
            dm = trainer.datamodule
            if dm is not None and hasattr(dm, "preview_dataset"):
                dataset = dm.preview_dataset()
            elif trainer.val_dataloaders is not None:
                dataset = trainer.val_dataloaders.dataset
            else:
                return None
            self._images = torch.stack([dataset[i][0] for i in range(min(self.num_images, len(dataset)))])
        return self._images

    def _denormalise(self, trainer: pl.Trainer, images: torch.Tensor) -> torch.Tensor:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "mean") and hasattr(dm, "std"):
            mean = torch.tensor(dm.mean, dtype=images.dtype).view(1, -1, 1, 1)
            std = torch.tensor(dm.std, dtype=images.dtype).view(1, -1, 1, 1)
            images = images * std + mean
        return images.clamp(0, 1)

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        images = self._fixed_batch(trainer)
        if images is None:
            return
        self.write(trainer, pl_module, images, f"epoch_{trainer.current_epoch:03d}")

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: torch.Tensor, name: str) -> str:
        """Reconstruct ``images``, save the grid as ``<run dir>/reconstructions/<name>.png`` and log it."""
        import torchvision.utils as vutils
        from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

        was_training = pl_module.training
        pl_module.eval()
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        with torch.no_grad():
            corrupted, recon = pl_module.reconstruct(images.to(pl_module.device), generator)
        pl_module.train(was_training)
        rows = [self._denormalise(trainer, x.detach().float().cpu()) for x in (images, corrupted, recon)]
        grid = vutils.make_grid(torch.cat(rows), nrow=images.shape[0], padding=2, pad_value=1.0)
        out_dir = os.path.join(trainer.default_root_dir, "reconstructions")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{name}.png")
        vutils.save_image(grid, path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
                logger.log_image(key="reconstructions", images=[array], caption=[name])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("reconstructions", grid, global_step=trainer.global_step)
        return path


class CollapseWarning(UserWarning):
    """The embedding's effective rank fell below ``collapse_rank_threshold``."""


OnCollapse = Literal["warn", "stop"]


class RepresentationDiagnostics(pl.Callback):
    """Every ``every_n_epochs`` epochs and after the last one, measure the embedding and act on collapse.

    On a fixed sample of ``num_images`` validation images (pretraining images for unlabeled data; see
    :mod:`sslpipe.evaluation.samples`) it computes, on the L2-normalised backbone features
    (:func:`sslpipe.evaluation.diagnostics.representation_metrics`): RankMe, uniformity (t=2), alignment
    (alpha=2) and energies of positive pairs (two of the method's views, or a lightly perturbed twin for
    methods without a pair), and the mean/min per-dimension std. They are logged as ``diag/*``; the last
    RankMe goes into ``metrics.json`` as ``rankme``.

    Every rank measures the same sample with the same weights, so every rank takes the same decision
    (stop, save) without communicating.

    Args:
        every_n_epochs: measure after every this many epochs (and after the last); 0 turns diagnostics off.
        num_images: size of the fixed sample (a seeded random subset).
        collapse_rank_threshold: RankMe below this is collapse: a :class:`CollapseWarning` naming the epoch. A
            constant embedding scores 1; a random-init ResNet-18 on digits about 2 (its ReLU features share one
            dominant direction, and RankMe does not centre them), after 5 epochs of SimCLR about 60.
        on_collapse: ``warn`` keeps training; ``stop`` ends the run after the epoch that collapsed.
        save_best_rank: keep the checkpoint with the highest RankMe as ``checkpoints/best_rank.ckpt``.
        seed: seed of the sample and of its views.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_images: int = 512,
        collapse_rank_threshold: float = 1.5,
        on_collapse: OnCollapse = "warn",
        save_best_rank: bool = True,
        seed: int = 0,
    ) -> None:
        from sslpipe.errors import ConfigError

        if every_n_epochs < 0:
            raise ConfigError(f"diagnostics.every_n_epochs must be >= 0 (0: off), got {every_n_epochs}")
        if on_collapse not in ("warn", "stop"):
            raise ConfigError(f"diagnostics.on_collapse must be 'warn' or 'stop', got {on_collapse!r}")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.collapse_rank_threshold = collapse_rank_threshold
        self.on_collapse = on_collapse
        self.save_best_rank = save_best_rank
        self.seed = seed
        self.best_rankme: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.collapse_epoch: Optional[int] = None
        self._images: Any = None

    # ------------------------------------------------------------------ state kept across a resume
    def state_dict(self) -> dict[str, Any]:
        return {"best_rankme": self.best_rankme, "best_epoch": self.best_epoch, "collapse_epoch": self.collapse_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_rankme = state_dict.get("best_rankme")
        self.best_epoch = state_dict.get("best_epoch")
        self.collapse_epoch = state_dict.get("collapse_epoch")

    # ------------------------------------------------------------------ when
    def _due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch + 1  # epochs finished
        last = (
            (trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch)
            or (trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step)
            or trainer.should_stop
        )
        return self.every_n_epochs > 0 and (last or epoch % self.every_n_epochs == 0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer):
            return
        metrics = self.measure(trainer, pl_module)
        if metrics is not None:
            self.act(trainer, metrics)

    # ------------------------------------------------------------------ what
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[dict[str, float]]:
        """Compute and log the ``diag/*`` metrics of the current weights (``None`` without a usable datamodule)."""
        from sslpipe.evaluation.diagnostics import representation_metrics
        from sslpipe.evaluation.samples import DiagnosticImages, embed_sample

        dm = trainer.datamodule
        if self._images is None:
            if dm is None or not hasattr(dm, "get_dataset"):
                rank_zero_warn("RepresentationDiagnostics needs an SSLDataModule; diagnostics are off for this run")
                self.every_n_epochs = 0
                return None
            self._images = DiagnosticImages.from_datamodule(dm, self.num_images, self.seed)
        sample = embed_sample(
            pl_module,
            self._images,
            pl_module.device,
            str(trainer.precision),
            batch_size=getattr(dm, "eval_batch_size", 256),
        )
        # Once per N epochs, outside the training step: converting to Python floats here costs one sync.
        metrics = {
            k: float(v) for k, v in representation_metrics(sample["clean"], sample["view1"], sample["view2"]).items()
        }
        for name, value in metrics.items():
            # every rank holds the same value: no reduction, logged once
            pl_module.log(f"diag/{name}", value, on_step=False, on_epoch=True, rank_zero_only=True)
        return metrics

    def act(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Warn (and stop, by flag) on collapse; keep the best-rank checkpoint; write ``rankme`` into metrics.json."""
        epoch, rankme = trainer.current_epoch, metrics["rankme"]
        if rankme < self.collapse_rank_threshold:
            if self.collapse_epoch is None:
                self.collapse_epoch = epoch
            action = "stopping the run (diagnostics.on_collapse: stop)" if self.on_collapse == "stop" else "continuing"
            rank_zero_warn(
                f"representation collapse at epoch {epoch}: RankMe {rankme:.2f} is below "
                f"diagnostics.collapse_rank_threshold {self.collapse_rank_threshold}; {action}",
                category=CollapseWarning,
            )
            if self.on_collapse == "stop":
                trainer.should_stop = True
        if self.best_rankme is None or rankme > self.best_rankme:
            self.best_rankme, self.best_epoch = rankme, epoch
            if self.save_best_rank:
                trainer.save_checkpoint(self.best_rank_path(trainer), weights_only=False)  # all ranks: a barrier
        if trainer.is_global_zero:
            summary = {"rankme": rankme, "best_rankme": self.best_rankme, "best_rankme_epoch": self.best_epoch}
            summary.update({f"diag_{k}": v for k, v in metrics.items() if k != "rankme"})
            if self.collapse_epoch is not None:
                summary["collapse_epoch"] = self.collapse_epoch
            write_metrics(trainer.default_root_dir, summary)

    @staticmethod
    def best_rank_path(trainer: pl.Trainer) -> str:
        """``best_rank.ckpt`` beside the run's other checkpoints (``<root>/checkpoints`` without a ModelCheckpoint)."""
        checkpoint = trainer.checkpoint_callback
        folder = getattr(checkpoint, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(folder, "best_rank.ckpt")
