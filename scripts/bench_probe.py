"""Linear-probe sweep: all probes in one batched pass vs one probe after another, on the same features.

    python scripts/bench_probe.py                       # GPU if there is one, a table of a few sizes
    python scripts/bench_probe.py --device cpu --n 4096 --d 256 --classes 100 --epochs 2
    python scripts/bench_probe.py --imagenet_estimate  # time kNN + probes at a fraction, scale to ImageNet-1k

"Sequential" is the classic loop (``nn.Linear`` + ``torch.optim.SGD`` + ``LambdaLR``, autograd, one probe per
(lr, wd) pair, as ``sslpipe linear`` trained before); "batched" is ``fit_linear_probes`` (one ``(B, D) @ (D, P*C)``
product per mini-batch for all probes, gradients written out, vectorised per-probe SGD). Both see the same
mini-batch order and the same fp32 features on the device. On a GPU the sequential loop is bound by kernel
launches (about 20 per probe per step), so batching wins by about the number of probes; on a CPU both are
bound by the same FLOPs and the ratio is small.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sslpipe.evaluation.knn import knn_search_faiss, knn_search_torch  # noqa: E402
from sslpipe.evaluation.linear import fit_linear_probes  # noqa: E402

# ImageNet-1k evaluation at ResNet-50 width with sslpipe linear's defaults (6 (lr, wd) pairs, 100 epochs, batch 256).
IMAGENET = dict(train=1_281_167, val=50_000, d=2048, classes=1000, probes=6, epochs=100, batch=256, holdout=0.1, k=20)
# Sustained fp32 (no TF32) GEMM throughput assumed for the GPU estimates, TFLOP/s, and per-step launch overhead.
GPU_FP32_TFLOPS = {"A100": 17.0, "H100 SXM": 50.0}
STEP_OVERHEAD_S = 1e-4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sequential(x, y, classes, lr, wd, epochs, batch_size, seed) -> nn.Linear:
    """One probe, the classic way (features already standardised)."""
    head = nn.Linear(x.shape[1], classes).to(x.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(
        [{"params": [head.weight], "weight_decay": wd}, {"params": [head.bias], "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
    )
    total = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g).to(x.device)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head


def run(
    n: int,
    d: int,
    classes: int,
    probes: int = 8,
    epochs: int = 2,
    device: str = "cpu",
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``probes`` probes trained batched vs sequentially on the same random ``(n, d)`` features.

    Returns ``{batched_s, sequential_s, ratio, settings}``; ``ratio`` is sequential / batched.
    """
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = (torch.randn(classes, d, generator=g)[y] + 2 * torch.randn(n, d, generator=g)).to(dev)
    y = y.to(dev)
    lrs = [0.01 * 2**i for i in range(probes)]
    wds = [0.0 if i % 2 == 0 else 1e-4 for i in range(probes)]
    mean, std = x.mean(0), x.std(0)
    xs = (x - mean) / std

    # warm-up (allocator, kernels, autotuning), untimed
    fit_linear_probes(x[: 4 * batch_size], y[: 4 * batch_size], classes, lrs, wds, 1, batch_size, seed, dev)
    _sequential(xs[: 4 * batch_size], y[: 4 * batch_size], classes, lrs[0], wds[0], 1, batch_size, seed)

    _sync(dev)
    start = time.perf_counter()
    fit_linear_probes(x, y, classes, lrs, wds, epochs, batch_size, seed, dev, moments=(mean, std))
    _sync(dev)
    batched = time.perf_counter() - start

    start = time.perf_counter()
    for lr, wd in zip(lrs, wds):
        _sequential(xs, y, classes, lr, wd, epochs, batch_size, seed)
    _sync(dev)
    sequential = time.perf_counter() - start
    settings = dict(
        n=n, d=d, classes=classes, probes=probes, epochs=epochs, batch_size=batch_size, device=str(dev),
        threads=torch.get_num_threads(),
    )  # fmt: skip
    return {"batched_s": batched, "sequential_s": sequential, "ratio": sequential / batched, "settings": settings}


def imagenet_flops() -> dict[str, float]:
    """FLOPs of kNN (similarities) and of the linear sweep + final probe (forward and weight-gradient GEMMs)."""
    c = IMAGENET
    knn = 2 * c["val"] * c["train"] * c["d"]
    per_sample_probe = 4 * c["d"] * c["classes"]  # (B,D)@(D,C) forward + (D,B)@(B,C) weight gradient, per probe
    fit = (1 - c["holdout"]) * c["train"]
    probe = c["epochs"] * per_sample_probe * (fit * c["probes"] + c["train"])
    steps = c["epochs"] * (math.ceil(fit / c["batch"]) + math.ceil(c["train"] / c["batch"]))
    return {"knn": knn, "linear": probe, "linear_steps": steps}


def imagenet_estimate(
    knn_queries: int = 1000, knn_bank: int = 64_000, probe_rows: int = 8192, device: str = "cpu"
) -> list[dict[str, Any]]:
    """ESTIMATED ImageNet-1k times of ``knn`` and ``linear`` from runs at a fraction of its size on ``device``.

    Measures this machine's throughput (FLOP/s) of the chunked torch kNN, faiss kNN and the batched probe at
    full width (d=2048, 1000 classes) on fewer rows, then scales by the FLOP ratio; the GPU columns assume the
    sustained fp32 throughput in ``GPU_FP32_TFLOPS`` (plus ``STEP_OVERHEAD_S`` per probe step). The top-k and
    softmax are counted as free: they are memory-bound passes over what the GEMMs write.
    """
    dev = torch.device(device)
    c = IMAGENET
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(knn_bank, c["d"], generator=g).half()
    queries = torch.randn(knn_queries, c["d"], generator=g).half()
    knn_flops = 2 * knn_queries * knn_bank * c["d"]
    rows = []
    for name, search in (("knn (torch, chunked)", knn_search_torch), ("knn (faiss, CPU)", knn_search_faiss)):
        if name.startswith("knn (faiss") and dev.type != "cpu":
            continue
        start = time.perf_counter()
        search(bank.to(dev) if search is knn_search_torch else bank, queries, c["k"])
        _sync(dev)
        rows.append({"job": name, "rate": knn_flops / (time.perf_counter() - start), "flops": imagenet_flops()["knn"]})
    y = torch.randint(0, c["classes"], (probe_rows,), generator=g)
    x = torch.randn(probe_rows, c["d"], generator=g).half()
    lrs = [0.01 * 2**i for i in range(c["probes"])]
    start = time.perf_counter()
    fit_linear_probes(x, y, c["classes"], lrs, [0.0] * c["probes"], 1, c["batch"], 0, dev)
    _sync(dev)
    probe_flops = 4 * c["d"] * c["classes"] * c["probes"] * probe_rows
    total = imagenet_flops()
    rows.append({"job": "linear (6-probe sweep + final)", "rate": probe_flops / (time.perf_counter() - start)})
    rows[-1].update(flops=total["linear"], steps=total["linear_steps"])
    for row in rows:
        row["here_s"] = row["flops"] / row["rate"]
        for gpu, tflops in GPU_FP32_TFLOPS.items():
            row[gpu] = row["flops"] / (tflops * 1e12) + row.get("steps", 0) * STEP_OVERHEAD_S
    return rows


def _print_estimate(device: str) -> None:
    rows = imagenet_estimate(device=device)
    gpus = list(GPU_FP32_TFLOPS)
    print(f"ESTIMATED ImageNet-1k evaluation times (scaled by FLOPs from runs on {device}; GPU columns assumed)\n")
    print("| job | PFLOP | measured here GFLOP/s | here (est.) | " + " | ".join(f"{g} (est.)" for g in gpus) + " |")
    print("|---|---|---|---|" + "---|" * len(gpus))
    for r in rows:
        cells = [f"{r[g] / 60:.1f} min" for g in gpus]
        print(
            f"| {r['job']} | {r['flops'] / 1e15:.2f} | {r['rate'] / 1e9:.1f} | {r['here_s'] / 3600:.1f} h | "
            + " | ".join(cells)
            + " |"
        )


def main() -> None:
    """Print a Markdown table for the given size, or for a default ladder of sizes."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, nargs="*", help="feature rows (default: a ladder)")
    ap.add_argument("--d", type=int, default=None, help="feature width")
    ap.add_argument("--classes", type=int, default=None)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--imagenet_estimate", action="store_true", help="estimate ImageNet-1k knn/linear times")
    args = ap.parse_args()
    if args.imagenet_estimate:
        _print_estimate(args.device)
        return
    gpu = args.device.startswith("cuda")
    if args.n:
        sizes = [(n, args.d or 2048, args.classes or 1000) for n in args.n]
    elif gpu:
        sizes = [(50_000, 512, 100), (50_000, 2048, 1000), (200_000, 2048, 1000)]
    else:
        sizes = [(4_096, 128, 10), (8_192, 512, 100)]
    print(f"{args.probes} probes, {args.epochs} epochs, batch {args.batch_size}, {args.device}\n")
    print("| n | d | classes | batched s | sequential s | sequential / batched |")
    print("|---|---|---|---|---|---|")
    for n, d, classes in sizes:
        r = run(n, d, classes, args.probes, args.epochs, args.device, args.batch_size)
        print(f"| {n:,} | {d} | {classes} | {r['batched_s']:.2f} | {r['sequential_s']:.2f} | {r['ratio']:.1f}x |")


if __name__ == "__main__":
    main()
