#!/usr/bin/env python
"""Benchmarks behind sslpipe's performance claims; prints Markdown tables.

  .venv/bin/python scripts/benchmark.py                 # all sections, CPU or the first GPU
  .venv/bin/python scripts/benchmark.py --only step     # one section: step | loss | augment

Sections:
  step     SimCLR training step (forward + backward + optimiser) images/s: fp32 vs bf16 autocast,
           NCHW vs channels-last, for the backbone/size given; the ratio is against fp32 NCHW.
  loss     nt_xent_loss vs a naive reference (full 2N x 2N similarity, mask, cross entropy per anchor
           written the textbook way), forward + backward time; the ratio is naive / sslpipe.
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

    print(f"\n### SimCLR training step: {args.backbone} (cifar_stem={args.cifar_stem}), {args.image_size} px, "
          f"batch {args.batch} x 2 views, {device}, {torch.get_num_threads()} threads\n")
    print("| precision | memory format | images/s | vs fp32 NCHW |\n|---|---|---|---|")
    base = None
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            torch.manual_seed(0)
            model = SimCLR(backbone=args.backbone, cifar_stem=args.cifar_stem, image_size=args.image_size,
                           channels_last=channels_last, proj_hidden_dim=512).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            views = [torch.randn(args.batch, 3, args.image_size, args.image_size, device=device) for _ in range(2)]
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

            def step():
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
    """The textbook form: 2N x 2N cosine matrix, diagonal masked, one cross entropy per anchor."""
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


def bench_loss(args, device, sync) -> None:
    from sslpipe.losses import nt_xent_loss

    print(f"\n### NT-Xent forward + backward, d=128, {device}\n")
    print("| batch N | sslpipe ms | naive ms | naive / sslpipe | max abs diff |\n|---|---|---|---|---|")
    for n in (64, 256, 1024):
        z1 = torch.randn(n, 128, device=device, requires_grad=True)
        z2 = torch.randn(n, 128, device=device, requires_grad=True)

        def ours():
            nt_xent_loss(z1, z2, 0.1).backward()

        def naive():
            naive_nt_xent(z1, z2, 0.1).backward()

        diff = (nt_xent_loss(z1, z2, 0.1) - naive_nt_xent(z1, z2, 0.1)).abs().item()
        a = _timeit(ours, 2, args.iters, sync)
        b = _timeit(naive, 1, max(1, args.iters // 3), sync)
        print(f"| {n} | {a * 1e3:.2f} | {b * 1e3:.1f} | {b / a:.0f}x | {diff:.1e} |")


def bench_augment(args) -> None:
    import numpy as np
    from PIL import Image

    from sslpipe.augment import SimCLRViews

    torch.set_num_threads(1)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (args.image_size, args.image_size, 3), dtype=np.uint8))
    print(f"\n### Augmentation: 2 SimCLR views of a {args.image_size}-px image, one core\n")
    print("| recipe | images/s | views/s |\n|---|---|---|")
    for name, kwargs in [("SimCLR ImageNet defaults (jitter, grey, blur)", {}),
                         ("no blur (CIFAR recipe)", {"blur_p": 0.0}),
                         ("digits demo (crop + brightness/contrast)", {"saturation": 0.0, "hue": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "hflip_p": 0.0})]:
        transform = SimCLRViews(**kwargs).build(args.image_size, (0.5,) * 3, (0.25,) * 3)
        sec = _timeit(lambda: transform(image), 20, 300, lambda: None)
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
