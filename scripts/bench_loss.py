#!/usr/bin/env python
"""NT-Xent forward + backward with the direct and the tiled contrastive core: time and peak memory per batch.

  .venv/bin/python scripts/bench_loss.py                          # N = 256 ... 65,536, d = 128, first GPU or CPU
  .venv/bin/python scripts/bench_loss.py --ns 256 1024 --block 512 --max_mb 4096

N is the number of images: the loss scores 2N anchors against 2N candidates, a (2N)^2 logit matrix in the
direct form. The direct form is skipped (None in the table) when its estimated memory, DIRECT_MATRICES fp32
(2N)^2 matrices, exceeds ``max_mb``; the tiled form needs O(N d + block^2) and always runs.

Peak memory is what the loss adds on top of its inputs:
  GPU  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated before.
  CPU  the resident-set high-water mark of a fresh process per (N, form): the kernel's ``VmHWM`` is reset
       by writing 5 to ``/proc/self/clear_refs`` once the inputs exist, one forward + backward runs, and the
       peak is ``VmHWM - VmRSS`` at the reset (after a tiny run that does torch's one-time set-up).
       A fresh process because the C allocator keeps freed pages
       (a second run in the same process would reuse them and read low); ``tracemalloc`` does not see
       torch's allocations at all. Linux only; elsewhere the CPU peak is None.
Times are the mean of ``iters`` runs after ``warmup`` runs (CPU: in the same fresh process, after the
memory measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from typing import Optional

import torch

# The direct form's peak in (2N)^2 fp32 matrices: logits, their masked copy, the exp inside logsumexp and
# the gradients of the backward; measured 4.7-5.0 on the CPU (N = 512, 1024). It decides which sizes are
# skipped, so an over-estimate only skips a size that would have fitted.
DIRECT_MATRICES = 5
MIB = 2**20


def direct_estimate_mb(n: int) -> float:
    """Estimated peak MiB of the direct form for N images."""
    return DIRECT_MATRICES * (2 * n) ** 2 * 4 / MIB


def _inputs(n: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    z1 = torch.randn(n, d, device=device, generator=g)
    z2 = z1 + 0.5 * torch.randn(n, d, device=device, generator=g)
    return z1.requires_grad_(), z2.requires_grad_()


def _step(z1: torch.Tensor, z2: torch.Tensor, block: Optional[int]) -> None:
    from sslpipe.losses import nt_xent_loss

    z1.grad = z2.grad = None
    nt_xent_loss(z1, z2, 0.1, gather=False, block=block).backward()


def _time_ms(z1: torch.Tensor, z2: torch.Tensor, block: Optional[int], warmup: int, iters: int) -> float:
    sync = torch.cuda.synchronize if z1.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        _step(z1, z2, block)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        _step(z1, z2, block)
    sync()
    return (time.perf_counter() - start) / iters * 1e3


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _measure_cpu_here(n: int, d: int, block: Optional[int], warmup: int, iters: int) -> dict:
    """In this (fresh) process: peak RSS growth of one forward + backward, then the mean time."""
    _step(*_inputs(4, d, torch.device("cpu")), block)  # torch's one-time set-up (thread pools, autograd engine)
    z1, z2 = _inputs(n, d, torch.device("cpu"))
    peak_mb = None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base_kb = _proc_status_kb("VmRSS")
        _step(z1, z2, block)
        peak_mb = (_proc_status_kb("VmHWM") - base_kb) / 1024
    except OSError:  # no procfs (not Linux) or a read-only clear_refs
        _step(z1, z2, block)
    return {"ms": _time_ms(z1, z2, block, warmup, iters), "peak_mb": peak_mb}


def _measure_cpu(n: int, d: int, block: Optional[int], warmup: int, iters: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_measure", json.dumps([n, d, block, warmup, iters])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ}).stdout
    return json.loads(out.strip().splitlines()[-1])


def _measure_cuda(n: int, d: int, device: torch.device, block: Optional[int], warmup: int, iters: int) -> dict:
    z1, z2 = _inputs(n, d, device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    _step(z1, z2, block)
    torch.cuda.synchronize(device)
    peak_mb = (torch.cuda.max_memory_allocated(device) - base) / MIB
    return {"ms": _time_ms(z1, z2, block, warmup, iters), "peak_mb": peak_mb}


def run(
    ns: list[int],
    d: int,
    device: torch.device,
    block: int,
    max_mb: float = 16384,
    warmup: int = 1,
    iters: int = 3,
) -> list[dict]:
    """One entry per N: ``{n, d, direct_ms, direct_peak_mb, tiled_ms, tiled_peak_mb}`` (direct: None if skipped)."""
    rows = []
    for n in ns:
        row: dict = {"n": n, "d": d}
        for name, form in (("direct", None), ("tiled", block)):
            if form is None and direct_estimate_mb(n) > max_mb:
                row[f"{name}_ms"] = row[f"{name}_peak_mb"] = None
                continue
            if device.type == "cuda":
                result = _measure_cuda(n, d, device, form, warmup, iters)
            else:
                result = _measure_cpu(n, d, form, warmup, iters)
            row[f"{name}_ms"], row[f"{name}_peak_mb"] = result["ms"], result["peak_mb"]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def markdown(rows: list[dict], block: int) -> str:
    """The entries of :func:`run` as a Markdown table."""

    def fmt(value: Optional[float], digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = [
        f"| N | 2N anchors | d | direct ms | direct peak MiB | tiled ms (block {block}) | tiled peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {2 * r['n']:,} | {r['d']} | {fmt(r['direct_ms'], 2)} | {fmt(r['direct_peak_mb'])} | "
            f"{fmt(r['tiled_ms'], 2)} | {fmt(r['tiled_peak_mb'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--block", type=int, default=None, help="tile size (default: sslpipe.losses.AUTO_BLOCK)")
    ap.add_argument("--max_mb", type=float, default=16384, help="skip the direct form above this estimate")
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: the first GPU, else cpu)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)  # internal: one CPU measurement
    args = ap.parse_args()
    if args._measure is not None:
        print(json.dumps(_measure_cpu_here(*json.loads(args._measure))))
        return
    from sslpipe.losses import AUTO_BLOCK

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    block = args.block or AUTO_BLOCK
    rows = run(args.ns, args.d, device, block, args.max_mb, args.warmup, args.iters)
    print(f"\n### NT-Xent forward + backward, direct vs tiled core, d={args.d}, {device}\n")
    print(markdown(rows, block))


if __name__ == "__main__":
    main()
