#!/usr/bin/env python
"""Benchmarks behind sslpipe's performance claims; prints Markdown tables.

  .venv/bin/python scripts/benchmark.py                 # all sections, CPU or the first GPU
  .venv/bin/python scripts/benchmark.py --only step     # one section: step | loss | augment

Sections:
  step     SimCLR training step (forward + backward + optimiser) images/s: fp32 vs bf16 autocast,
           NCHW vs channels-last, for the backbone/size given; the ratio is against fp32 NCHW.
  loss     nt_xent_loss vs the vectorised form common in public SimCLR code and vs a per-anchor loop,
           forward + backward time; ratios are other / sslpipe.
  augment  per-sample torchvision-v2 SimCLR views per second per core, at the given image size.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F


def _timeit(fn, warmup: int, iters: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def bench_step(args, device, sync) -> None:
    from sslpipe.methods import SimCLR

    print(
        f"\n### SimCLR training step: {args.backbone} (cifar_stem={args.cifar_stem}), {args.image_size} px, "
        f"batch {args.batch} x 2 views, {device}, {torch.get_num_threads()} threads\n"
    )
    print("| precision | memory format | images/s | vs fp32 NCHW |\n|---|---|---|---|")
    base = None
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            torch.manual_seed(0)
            model = SimCLR(
                backbone=args.backbone,
                cifar_stem=args.cifar_stem,
                image_size=args.image_size,
                channels_last=channels_last,
                proj_hidden_dim=512,
            ).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            views = [torch.randn(args.batch, 3, args.image_size, args.image_size, device=device) for _ in range(2)]
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

            def step(model=model, opt=opt, views=views, ctx=ctx):
                with ctx:
                    loss = model.ssl_step(views, None).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            sec = _timeit(step, args.warmup, args.iters, sync)
            ips = args.batch / sec
            base = base or ips
            print(f"| {precision} | {'channels-last' if channels_last else 'NCHW'} | {ips:,.0f} | {ips / base:.2f}x |")


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """The textbook form: 2N x 2N cosine matrix, then one cross entropy per anchor in a Python loop."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    sim = F.cosine_similarity(z[:, None, :], z[None, :, :], dim=-1) / t
    losses = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        pos = sim[i, j]
        losses.append(-pos + torch.logsumexp(others, 0))
    return torch.stack(losses).mean()


def gathered_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """The vectorised form common in public SimCLR code: pick the positives off the two N-th diagonals,
    boolean-index the 2N-2 negatives of every row into a (2N, 2N-2) matrix, cross entropy with label 0."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / t
    positives = torch.cat([torch.diagonal(sim, n), torch.diagonal(sim, -n)]).unsqueeze(1)
    keep = ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
    keep[torch.arange(2 * n), (torch.arange(2 * n) + n) % (2 * n)] = False
    negatives = sim[keep].view(2 * n, 2 * n - 2)
    logits = torch.cat([positives, negatives], dim=1)
    return F.cross_entropy(logits, torch.zeros(2 * n, dtype=torch.long, device=z.device))


def bench_loss(args, device, sync) -> None:
    from sslpipe.losses import nt_xent_loss

    print(f"\n### NT-Xent forward + backward, d=128, {device}\n")
    print(
        "sslpipe sets the diagonal of the full logit matrix to -inf (no gathered copy of the negatives);\n"
        "'gathered' is the "
        "vectorised form common in public SimCLR code;\n"
        "'loop' is one cross entropy per anchor (skipped above N=256).\n"
    )
    print("| batch N | sslpipe ms | gathered ms | gathered / sslpipe | loop ms | loop / sslpipe | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for n in (64, 256, 1024, 4096):
        z1 = torch.randn(n, 128, device=device, requires_grad=True)
        z2 = torch.randn(n, 128, device=device, requires_grad=True)
        runs = {"sslpipe": nt_xent_loss, "gathered": gathered_nt_xent}
        if n <= 256:
            runs["loop"] = naive_nt_xent
        times, diff = {}, 0.0
        ref = nt_xent_loss(z1, z2, 0.1)
        for name, fn in runs.items():
            diff = max(diff, (fn(z1, z2, 0.1) - ref).abs().item())
            iters = args.iters if name != "loop" else max(1, args.iters // 3)
            times[name] = _timeit(lambda fn=fn, z1=z1, z2=z2: fn(z1, z2, 0.1).backward(), 1, iters, sync)
        a = times["sslpipe"]
        loop = f"{times['loop'] * 1e3:,.1f} | {times['loop'] / a:,.0f}x" if "loop" in times else "- | -"
        print(
            f"| {n} | {a * 1e3:.2f} | {times['gathered'] * 1e3:.2f} | "
            f"{times['gathered'] / a:.2f}x | {loop} | {diff:.1e} |"
        )


def bench_augment(args) -> None:
    import numpy as np
    from PIL import Image

    from sslpipe.augment import SimCLRViews

    torch.set_num_threads(1)
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (args.image_size, args.image_size, 3), dtype=np.uint8)
    )
    print(f"\n### Augmentation: 2 SimCLR views of a {args.image_size}-px image, one core\n")
    print("| recipe | images/s | views/s |\n|---|---|---|")
    for name, kwargs in [
        ("SimCLR ImageNet defaults (jitter, grey, blur)", {}),
        ("no blur (CIFAR recipe)", {"blur_p": 0.0}),
        (
            "digits demo (crop + brightness/contrast)",
            {"saturation": 0.0, "hue": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "hflip_p": 0.0},
        ),
    ]:
        transform = SimCLRViews(**kwargs).build(args.image_size, (0.5,) * 3, (0.25,) * 3)
        sec = _timeit(lambda transform=transform: transform(image), 20, 300, lambda: None)
        print(f"| {name} | {1 / sec:,.0f} | {2 / sec:,.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["step", "loss", "augment"], default=None)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--cifar_stem", action="store_true")
    ap.add_argument("--image_size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    threads = torch.get_num_threads()
    if args.only in (None, "augment"):
        bench_augment(args)  # one core: the figure scales with data.num_workers
        torch.set_num_threads(threads)
    if args.only in (None, "loss"):
        bench_loss(args, device, sync)
    if args.only in (None, "step"):
        bench_step(args, device, sync)


if __name__ == "__main__":
    main()
