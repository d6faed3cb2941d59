"""Run directories: one folder per command invocation, the same folder on every rank, and loggers inside it."""

from __future__ import annotations

import csv
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

from sslpipe.errors import ConfigError, check_choice

ENV_RUN_DIR = "SSLPIPE_RUN_DIR"


LOGGERS = ("csv", "wandb", "tensorboard")
WANDB_MODES = ("offline", "online", "disabled")
ON_NAN = ("stop", "skip")


@dataclass
class RunOptions:
    """Where a run writes, what it logs to and how it survives interruptions (the ``run.*`` keys).

    Attributes:
        name: run folder name under ``trainer.default_root_dir``; default ``<time>-<command>-<method>-<dataset>``
            (``job<id>-...`` under SLURM or with ``SSLPIPE_RUN_ID``). A named run always uses the same folder, so
            ``--run.name X --ckpt_path last`` continues run ``X``.
        loggers: any of ``csv``, ``wandb``, ``tensorboard``.
        wandb_project: W&B project name.
        wandb_mode: ``offline`` (default: no server needed; sync later with ``wandb sync``), ``online`` or
            ``disabled``; the ``WANDB_MODE`` environment variable wins when set. ``online`` without an API key or
            without a reachable server falls back to the other loggers with a warning.
        checkpoint_every_n_steps: also write ``checkpoints/last.ckpt`` every this many optimiser steps (0: only
            after validation), so a crash or pre-emption loses at most this many steps.
        on_nan: a non-finite training loss ``stop``s the run (naming the step and the last good checkpoint) or
            ``skip``s that step's update and restores the BatchNorm statistics its forward changed (costs a copy of
            those and one host sync per step). Either way no checkpoint is written from a non-finite state: a
            queue or memory bank filled from a non-finite batch stops the run at the next checkpoint.
    """

    name: Optional[str] = None
    loggers: list[str] = field(default_factory=lambda: ["csv", "wandb"])
    wandb_project: str = "sslpipe"
    wandb_mode: str = "offline"
    checkpoint_every_n_steps: int = 500
    on_nan: str = "stop"

    def __post_init__(self) -> None:
        for name in self.loggers:
            check_choice("run.loggers", name, LOGGERS)
        check_choice("run.wandb_mode", self.wandb_mode, WANDB_MODES)
        check_choice("run.on_nan", self.on_nan, ON_NAN)
        if self.checkpoint_every_n_steps < 0:
            raise ConfigError(
                f"run.checkpoint_every_n_steps={self.checkpoint_every_n_steps} is invalid: use 0 (only after "
                "validation) or a positive step count"
            )


def make_run_dir(root: Optional[str], parts: list[str], name: Optional[str] = None) -> str:
    """Create and return the run directory, identical on every rank of one job.

    Rank 0 of a single launch picks ``<root>/<time>-<parts>`` and exports it in ``SSLPIPE_RUN_DIR`` so
    the processes Lightning spawns for the other ranks inherit it. Where ranks start independently
    (torchrun, SLURM) a job id stands in for the time so they agree without talking: ``SSLPIPE_RUN_ID``
    if set (the torchrun launcher sets it), else torchrun's rendezvous id, else ``SLURM_JOB_ID``.
    """
    if os.environ.get(ENV_RUN_DIR):
        run_dir = os.environ[ENV_RUN_DIR]
        os.makedirs(run_dir, exist_ok=True)
        return run_dir
    root = root or "runs"
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    job = (
        os.environ.get("SSLPIPE_RUN_ID")
        or (elastic if elastic not in (None, "", "none") else None)
        or os.environ.get("SLURM_JOB_ID")
    )
    stamp = f"job{job}" if job else time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(root, name or "-".join([stamp, *parts]))
    run_dir, n = base, 1
    while not job and not name and os.path.exists(run_dir):  # two runs in the same second: keep both
        n += 1
        run_dir = f"{base}-{n}"
    os.makedirs(run_dir, exist_ok=True)
    os.environ[ENV_RUN_DIR] = run_dir
    return run_dir


WANDB_PROBE_TIMEOUT = 3.0  # seconds to reach the W&B server before falling back to the other loggers
WANDB_INIT_TIMEOUT = 30.0


def wandb_online_problem() -> Optional[str]:
    """Why W&B cannot log online from here (no API key, server unreachable), or ``None`` if it can.

    Checked before any ``WandbLogger`` exists, within :data:`WANDB_PROBE_TIMEOUT` seconds: without this
    wandb would prompt for a key or retry the connection for minutes, or fail the run at its first log call.
    """
    import netrc
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        try:
            key = (netrc.netrc().authenticators(host) or (None, None, None))[2]
        except (OSError, netrc.NetrcParseError):
            key = None
    if not key:
        return (
            f"no API key for {host} (set WANDB_API_KEY or run `wandb login`); "
            "continuing with the other loggers (or set WANDB_MODE=offline and `wandb sync` later)"
        )
    try:
        socket.create_connection((host, port), timeout=WANDB_PROBE_TIMEOUT).close()
    except OSError as err:
        return (
            f"cannot reach {host}:{port} ({err}); continuing with the other loggers "
            "(WANDB_MODE=offline keeps a local W&B run)"
        )
    return None


def _continued_csv_logger_class() -> type:
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.loggers.csv_logs import ExperimentWriter
    from pytorch_lightning.loggers.logger import rank_zero_experiment

    class ContinuedWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:  # Lightning's deletes the file here; keep it and its header
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    class ContinuedCSVLogger(CSVLogger):
        """A CSVLogger that appends to the ``metrics.csv`` of the run it resumes instead of deleting it."""

        @property
        @rank_zero_experiment
        def experiment(self) -> ExperimentWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = ContinuedWriter(log_dir=self.log_dir)
            return self._experiment

    return ContinuedCSVLogger


def build_loggers(run_dir: str, options: RunOptions, run_name: str, resuming: bool = False) -> list:
    """Instantiate the configured Lightning loggers, all writing under ``run_dir``.

    ``resuming``: the CSV log continues the interrupted run's ``metrics.csv`` (rows after the resumed checkpoint's
    step, logged before a crash, appear twice: the later row is the resumed run's).

    W&B runs offline unless asked otherwise, so a machine without a W&B server never crashes; if
    wandb cannot start at all the run continues with the other loggers and a warning.
    """
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    loggers = []
    for name in options.loggers:
        if name == "csv":
            loggers.append((_continued_csv_logger_class() if resuming else CSVLogger)(run_dir, name="csv", version=""))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
        elif name == "wandb":
            mode = os.environ.get("WANDB_MODE", options.wandb_mode)
            if mode == "disabled":
                continue
            try:
                import wandb  # noqa: F401
            except Exception as err:  # pragma: no cover - wandb is a dependency, but never fatal
                warnings.warn(f"wandb unavailable ({err}); continuing without it", stacklevel=2)
                continue
            if mode == "online" and (problem := wandb_online_problem()):
                warnings.warn(f"W&B online logging is off for this run: {problem}", stacklevel=2)
                continue
            os.environ.setdefault("WANDB_SILENT", "true")
            loggers.append(
                WandbLogger(
                    project=options.wandb_project,
                    name=run_name,
                    save_dir=run_dir,
                    offline=mode != "online",
                    # a server that accepts the connection but stalls gives up after this, not wandb's 90 s
                    settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT),
                )
            )
        else:
            check_choice("run.loggers", name, LOGGERS)
    return loggers


def finish_loggers(loggers: list) -> None:
    """End the W&B runs among ``loggers`` (Lightning leaves them open when fit returns).

    Otherwise the next run started in the same process (tests, sweeps calling ``sslpipe.cli.main``)
    would reuse this W&B run and log into this run directory.
    """
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        # `_experiment`, not `experiment`: reading the property would start (re-initialise) a run that never began.
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger._experiment.finish()
