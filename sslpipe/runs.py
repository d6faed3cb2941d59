"""Run directories: one folder per command invocation, the same folder on every rank, and loggers inside it."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

ENV_RUN_DIR = "SSLPIPE_RUN_DIR"


@dataclass
class RunOptions:
    """Where a run writes and what it logs to (the ``run.*`` keys).

    Attributes:
        name: run folder name under ``trainer.default_root_dir``; default ``<time>-<command>-<method>-<dataset>``.
        loggers: any of ``csv``, ``wandb``, ``tensorboard``.
        wandb_project: W&B project name.
        wandb_mode: ``offline`` (default: no server needed; sync later with ``wandb sync``), ``online`` or
            ``disabled``; the ``WANDB_MODE`` environment variable wins when set.
    """

    name: Optional[str] = None
    loggers: list[str] = field(default_factory=lambda: ["csv", "wandb"])
    wandb_project: str = "sslpipe"
    wandb_mode: str = "offline"


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
    while not job and os.path.exists(run_dir):  # two runs in the same second: keep both
        n += 1
        run_dir = f"{base}-{n}"
    os.makedirs(run_dir, exist_ok=True)
    os.environ[ENV_RUN_DIR] = run_dir
    return run_dir


def build_loggers(run_dir: str, options: RunOptions, run_name: str) -> list:
    """Instantiate the configured Lightning loggers, all writing under ``run_dir``.

    W&B runs offline unless asked otherwise, so a machine without a W&B server never crashes; if
    wandb cannot start at all the run continues with the other loggers and a warning.
    """
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    loggers = []
    for name in options.loggers:
        if name == "csv":
            loggers.append(CSVLogger(run_dir, name="csv", version=""))
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
            os.environ.setdefault("WANDB_SILENT", "true")
            loggers.append(
                WandbLogger(project=options.wandb_project, name=run_name, save_dir=run_dir, offline=mode == "offline")
            )
        else:
            raise ValueError(f"unknown logger {name!r} in run.loggers: choose from 'csv', 'wandb', 'tensorboard'")
    return loggers


def finish_loggers(loggers: list) -> None:
    """End the W&B runs among ``loggers`` (Lightning leaves them open when fit returns).

    Otherwise the next run started in the same process (tests, sweeps calling ``sslpipe.cli.main``)
    would reuse this W&B run and log into this run directory.
    """
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # a no-op stand-in on ranks other than 0
