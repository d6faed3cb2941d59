"""Shared test utilities: run the CLI in-process, run a function on N gloo ranks on the CPU."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Tiny, fast settings every end-to-end test starts from (each test adds its own).
TINY = [
    "--data.batch_size",
    "32",
    "--data.num_workers",
    "0",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "3",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.precision",
    "32-true",
    "--run.loggers",
    "[csv]",
]


def run_cli(args: list[str], env_clear_run_dir: bool = True) -> tuple[str, str]:
    """Run ``sslpipe <args>`` in this process; return (run directory = last stdout line, all stdout)."""
    from sslpipe.cli import main
    from sslpipe.runs import ENV_RUN_DIR

    if env_clear_run_dir:
        os.environ.pop(ENV_RUN_DIR, None)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(args)
    os.environ.pop(ENV_RUN_DIR, None)
    out = buf.getvalue()
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1], out


def read_metrics(run_dir: str) -> dict[str, Any]:
    """The run's metrics.json as a dict."""
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        out = fn(rank, world_size, *args)
        torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return each rank's result.

    ``fn`` must be a module-level function (it is pickled) and return tensors/picklable objects.
    """
    for attempt in range(2):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                mp.spawn(_worker, args=(world_size, _free_port(), fn, args, tmp), nprocs=world_size, join=True)
            except mp.ProcessExitedException:
                # A worker killed by a signal (gloo aborting when the free port was taken between the probe and
                # the rendezvous; seen once in CI): retry once on a fresh port. A Python error in ``fn`` raises
                # ProcessRaisedException instead, which is never retried.
                if attempt:
                    raise
                continue
            return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
    raise AssertionError("unreachable")
