#!/usr/bin/env python
"""SimCLR views per sample on one CPU core vs the photometric half batched on a device (``data.augment_on``).

  .venv/bin/python scripts/bench_augment.py                       # 32 and 224 px, first GPU or CPU
  .venv/bin/python scripts/bench_augment.py --sizes 32 --device cpu --batch 64 --json

Per image size (SimCLRViews() defaults, two views per image, input images 8/7 of the view side so the crop
resamples):

* ``per_sample_images_per_s_per_core``: the whole recipe per sample (``augment_on cpu``, what a loader worker does),
  one thread;
* ``geometric_images_per_s_per_core``: the worker half of ``augment_on device`` (crop + flip to uint8), one thread;
* ``batched_images_per_s``: the device half (photometric ops + normalisation) over a batch of uint8 views already
  on ``device`` (transfer not included), all the device's threads/SMs;
* ``cores_to_match``: how many worker cores the per-sample path needs to feed the batched rate.

Times are the mean of ``iters`` runs after ``warmup`` runs; CUDA is synchronised around each timed run.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable, Optional

import numpy as np
import torch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _time(fn: Callable[[], Any], iters: int, warmup: int, device: torch.device) -> float:
    """Mean seconds of ``fn`` over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / max(1, iters)


def _one_thread(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _time(fn, iters, warmup, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


def _row(size: int, dev: torch.device, iters: int, warmup: int, batch: int) -> dict[str, Any]:
    from PIL import Image
    from torch.utils.data import default_collate

    from sslpipe.augment import SimCLRViews

    recipe = SimCLRViews()
    per_sample_images = min(batch, 32)  # images per timed per-sample run (224 px: ~10 ms each per core)
    side = size * 8 // 7
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(8)]
    full = recipe.build(size, MEAN, STD)
    geometric = recipe.build_geometric(size)
    batched = recipe.build_batched(size, MEAN, STD)

    def per_sample(transform: Callable[[Any], Any]) -> None:
        for i in range(per_sample_images):
            transform(images[i % len(images)])

    full_s = _one_thread(lambda: per_sample(full), iters, warmup)
    geometric_s = _one_thread(lambda: per_sample(geometric), iters, warmup)
    views = [v.to(dev) for v in default_collate([geometric(images[i % len(images)]) for i in range(batch)])]
    generator = torch.Generator(device=dev).manual_seed(0)
    batched_s = _time(lambda: batched(views, generator), iters, warmup, dev)
    per_core, batched_rate = per_sample_images / full_s, batch / batched_s
    return {
        "image_size": size,
        "input_side": side,
        "batch": batch,
        "device": str(dev),
        "recipe": "SimCLRViews() defaults, 2 views",
        "iters": iters,
        "warmup": warmup,
        "per_sample_images_per_s_per_core": per_core,
        "geometric_images_per_s_per_core": per_sample_images / geometric_s,
        "batched_images_per_s": batched_rate,
        "batched_ms": 1000 * batched_s,
        "cores_to_match": batched_rate / per_core,
    }


def run(
    sizes: tuple[int, ...] | list[int] = (32, 224),
    device: Optional[str] = None,
    iters: int = 10,
    warmup: int = 1,
    batch: Optional[int] = None,
) -> list[dict[str, Any]]:
    """One row per image size: per-sample CPU images/s per core vs batched images/s on ``device``."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = batch or (256 if dev.type == "cuda" else 32)
    return [_row(size, dev, iters, warmup, batch) for size in sizes]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`run` as a Markdown table."""
    lines = [
        "| image size | batch | device | per-sample views, img/s per core | crop+flip only, img/s per core "
        "| batched photometric, img/s | ms per batch | cores to match |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['image_size']} | {r['batch']} | {r['device']} | {r['per_sample_images_per_s_per_core']:,.0f} | "
            f"{r['geometric_images_per_s_per_core']:,.0f} | {r['batched_images_per_s']:,.0f} | "
            f"{r['batched_ms']:,.2f} | {r['cores_to_match']:,.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: the first GPU, else cpu)")
    ap.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 32 on the CPU")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args()
    rows = run(args.sizes, args.device, args.iters, args.warmup, args.batch)
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
