#!/usr/bin/env python
"""Benchmarks behind sslpipe's performance claims: Markdown tables on stdout, every number in a JSON file.

  python scripts/benchmark.py --json bench.json                   # augment, loss, train, probe; first GPU or CPU
  python scripts/benchmark.py --gpu --json h200.json              # the GPU set below (sized for an H100/H200)
  python scripts/benchmark.py --sections train --quick --device cpu --json /tmp/b.json   # tiny: checks it runs
  python scripts/benchmark.py --markdown README_SECTION.md --from bench.json               # README section from JSON

Sections (``--sections``, comma-separated; each entry of the JSON carries its settings):
  augment  ``scripts/bench_augment.py``'s ``run`` (per-sample vs batched views), and SimCLR views per core for
           three recipes (per-sample torchvision v2).
  loss     ``scripts/bench_loss.py``'s ``run`` (direct vs tiled contrastive core: time, peak memory), and
           ``nt_xent_loss`` against the vectorised form common in public SimCLR code and a per-anchor loop.
  train    training steps on synthetic batches (forward, backward, optimiser, momentum EMA), images/s and peak
           memory (GPU: what ``max_memory_allocated`` reads for that model alone; CPU: not measured):
             precision x memory format (SimCLR); every method; ``model.compile`` off/on; cuDNN benchmark off/on
             (GPU); optimiser step alone: LARS foreach vs loop, SGD/AdamW fused (GPU) vs foreach vs loop;
             ``data.augment_on`` none (views already on the device) / cpu (per-sample views in loader workers) /
             device (crop + flip in the workers, photometric ops batched on the device).
  probe    ``scripts/bench_probe.py``'s ``run`` (batched linear-probe sweep vs one probe after another).
  gpu      (``--gpu``) SimCLR ResNet-50 224 px bf16 images/s and the share of the GPU's bf16 dense peak;
           CIFAR ResNet-18 images/s with augment_on none/cpu/device; the largest batch the direct and the tiled
           NT-Xent fit (forward + backward, d = 128).

Variants compared in a table are timed interleaved (``--rounds`` rounds of ``--iters`` steps each, in turn;
the median round counts), so a drifting machine load affects all alike. On a shared CPU treat the numbers as
indicative ratios only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import inspect
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MIB = 2**20
SECTIONS = ("augment", "loss", "train", "probe", "gpu")
DEFAULT_SECTIONS = ("augment", "loss", "train", "probe")
METHODS = ("simclr", "moco_v2", "moco_v3", "pirl", "mae", "simmim", "dae")
# the view layout each method's recipe produces: two views, image + jigsaw tiles, or one view
VIEWS = dict(simclr="pair", moco_v2="pair", moco_v3="pair", pirl="jigsaw", mae="one", simmim="one", dae="one")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# bf16 dense tensor-core peaks in TFLOP/s: vendor figures (datasheets, without sparsity), not measured here.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "RTX 4090": 165.0}
# A SimCLR step on a 224-px image with ResNet-50: 2 views x (forward + backward ~ 3 forwards) x 8.1 GFLOP
# (4.05 G multiply-adds per forward).
SIMCLR_R50_GFLOP_PER_IMAGE = 48.6


# ---------------------------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bf16_peak_tflops(name: str) -> Optional[float]:
    """The vendor's bf16 dense peak for a GPU name such as ``NVIDIA H100 80GB HBM3``; ``None`` if unknown.

    NVL variants (lower clocks than SXM, figures not in the table) give ``None`` rather than the SXM figure.
    """
    if "NVL" in name.upper():
        return None
    for key, tflops in BF16_PEAK_TFLOPS.items():  # "H100 PCIe" is tried before "H100"
        if re.search(r"(?<![A-Za-z0-9])" + re.escape(key).replace(r"\ ", r"[ -]?") + r"(?![0-9])", name, re.I):
            return tflops
    return None


def synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _call(fn: Callable, **candidates: Any) -> Any:
    """``fn`` with those of ``candidates`` its signature accepts (the other helpers' ``run`` functions differ)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**candidates)
    return fn(**{k: v for k, v in candidates.items() if k in params})


def _script(name: str) -> tuple[Optional[Any], str]:
    """``scripts/<name>.py`` imported, or ``None`` and why (another helper's script may not be merged yet)."""
    try:
        return importlib.import_module(name), ""
    except ImportError as err:  # ModuleNotFoundError, or an API of sslpipe it needs that this tree lacks
        return None, f"scripts/{name}.py could not be imported ({err}); section skipped"


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Variant:
    """One row of a compared table: its settings, the step to time, and what it measured."""

    settings: dict[str, Any]
    step: Optional[Callable[[], None]] = None
    images: int = 0  # images per step (0: report ms only)
    warmup: int = 1
    # at rest, between steps: drop the gradients, count what stays (parameters, buffers, optimiser state, a fixed
    # input batch); the GPU peak is that plus the step's peak above it, what max_memory_allocated reads alone
    rest: Optional[Callable[[], int]] = None
    skipped: str = ""
    times: list[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None

    def entry(self) -> dict[str, Any]:
        out = dict(self.settings)
        if self.skipped:
            out["skipped"] = self.skipped
            return out
        seconds = statistics.median(self.times)
        out["step_ms"] = 1e3 * seconds
        if self.images:
            out["images_per_s"] = self.images / seconds
        out["peak_mib"] = None if self.peak_bytes is None else self.peak_bytes / MIB
        return out


def measure(variants: list[Variant], device: torch.device, iters: int, rounds: int) -> list[dict[str, Any]]:
    """Warm every variant up, then ``rounds`` rounds of ``iters`` steps of each in turn; GPU peak memory last."""
    sync = synchronizer(device)
    live = [v for v in variants if not v.skipped]
    for v in live:
        try:
            for _ in range(v.warmup):
                v.step()
            sync()
        except Exception as err:  # an out-of-memory or unsupported setting skips the row, not the benchmark
            v.skipped = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    live = [v for v in live if not v.skipped]
    for _ in range(rounds):
        for v in live:
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                v.step()
            sync()
            v.times.append((time.perf_counter() - start) / iters)
    if device.type == "cuda":
        for v in live:
            resting = v.rest() if v.rest is not None else 0
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            v.step()
            sync()
            v.peak_bytes = resting + torch.cuda.max_memory_allocated(device) - before
    return [v.entry() for v in variants]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- train section
@dataclass
class TrainSettings:
    """One training-step configuration (the keys of a ``train`` entry)."""

    method: str = "simclr"
    backbone: str = "resnet18"
    cifar_stem: bool = False
    image_size: int = 32
    batch: int = 128
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    channels_last: bool = False
    compile: bool = False
    augment_on: str = "none"  # none | cpu | device
    optimizer: Optional[str] = None  # None: the method's own
    lars_foreach: bool = True
    cudnn_benchmark: bool = True
    small_heads: bool = False  # --quick: narrow heads and decoders

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "small_heads"}


def build_method(s: TrainSettings, compile_kwargs: dict[str, Any]):
    """The method of ``s`` with its defaults (narrow heads under ``small_heads``), no online probe."""
    from sslpipe import methods

    common: dict[str, Any] = dict(
        backbone=s.backbone,
        image_size=s.image_size,
        online_probe=False,
        channels_last=s.channels_last,
        compile=s.compile,
        compile_kwargs=compile_kwargs,
    )
    if s.method in ("mae", "simmim", "dae"):
        vit = {"patch_size": 4 if s.image_size <= 64 else 16}
        if s.small_heads:
            vit.update(depth=1)
        common["backbone_kwargs"] = vit
    else:
        common["cifar_stem"] = s.cifar_stem
    small = s.small_heads
    heads = {
        "simclr": dict(proj_hidden_dim=64) if small else {},
        "moco_v2": dict(proj_hidden_dim=64, queue_size=256) if small else {},
        "moco_v3": dict(proj_hidden_dim=64, pred_hidden_dim=64) if small else {},
        "pirl": dict(num_samples=256, num_negatives=64, tile_dim=32) if small else dict(num_samples=50_000),
        "mae": dict(decoder_dim=64, decoder_depth=1, decoder_heads=2) if small else {},
        "simmim": {},
        "dae": {},
    }[s.method]
    classes = {
        "simclr": methods.SimCLR,
        "moco_v2": methods.MoCoV2,
        "moco_v3": methods.MoCoV3,
        "pirl": methods.PIRL,
        "mae": methods.MaskedAutoencoder,
        "simmim": methods.SimMIM,
        "dae": methods.DenoisingAutoencoder,
    }
    if s.method not in classes:
        raise ValueError(f"unknown method {s.method!r}; choose from {', '.join(METHODS)}")
    return classes[s.method](**common, **heads)


def synthetic_views(method: str, batch: int, size: int, device: torch.device) -> list[torch.Tensor]:
    """Random normalised views in the layout the method's recipe produces (already on the device)."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, size, size, generator=g)
    kind = VIEWS[method]
    if kind == "pair":
        views = [image, torch.randn(batch, 3, size, size, generator=g)]
    elif kind == "jigsaw":
        from sslpipe.augment import JigsawViews

        tile = JigsawViews().geometry(size)[2]
        views = [image, torch.randn(batch, 9, 3, tile, tile, generator=g), torch.zeros(batch, dtype=torch.long)]
    else:
        views = [image]
    return [v.to(device) for v in views]


class _Photos(torch.utils.data.Dataset):
    """Random RGB photos (a pool of 64, a bit larger than the crop) through ``transform``; (views, label, index)."""

    def __init__(self, length: int, size: int, transform: Callable) -> None:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        side = round(size * 1.15)
        self.pool = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(64)]
        self.length, self.transform = length, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.transform(self.pool[i % len(self.pool)]), 0, i


def _endless(loader):
    while True:
        yield from loader


def view_source(s: TrainSettings, device: torch.device, workers: int) -> Callable[[], list[torch.Tensor]]:
    """A function giving each step's views: fixed tensors (``none``) or the next batch of a real loader."""
    if s.augment_on == "none":
        views = synthetic_views(s.method, s.batch, s.image_size, device)
        return lambda: views
    if VIEWS[s.method] != "pair":
        raise ValueError(f"augment_on {s.augment_on} is benchmarked for two-view methods, not {s.method}")
    from sslpipe.augment import SimCLRViews

    recipe = SimCLRViews()
    batched = None
    if s.augment_on == "cpu":
        transform = recipe.build(s.image_size, MEAN, STD)
    elif s.augment_on == "device":
        if not hasattr(recipe, "build_geometric"):
            raise NotImplementedError("this tree has no batched device augmentation (data.augment_on device)")
        transform = recipe.build_geometric(s.image_size)
        batched = recipe.build_batched(s.image_size, MEAN, STD)
    else:
        raise ValueError(f"augment_on must be none, cpu or device, got {s.augment_on!r}")
    loader = torch.utils.data.DataLoader(
        _Photos(s.batch * 16, s.image_size, transform),
        batch_size=s.batch,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    batches = _endless(loader)
    generator = torch.Generator(device=device).manual_seed(0)

    def next_views() -> list[torch.Tensor]:
        views = [v.to(device, non_blocking=True) for v in next(batches)[0]]
        return batched(views, generator) if batched is not None else views

    return next_views


def train_variant(s: TrainSettings, device: torch.device, args: argparse.Namespace) -> Variant:
    """A :class:`Variant` running training steps of ``s`` (or the reason it cannot)."""
    from sslpipe.optim import LARS, build_optimizer, param_groups

    variant = Variant(settings=s.as_dict(), images=s.batch, warmup=args.warmup + (2 if s.compile else 0))
    if s.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        variant.skipped = "bf16 is not supported on this GPU"
        return variant
    try:
        torch.manual_seed(0)
        model = build_method(s, compile_kwargs(args, device)).to(device)
        model.on_fit_start()  # e.g. the masked models' attention path on CPUs
        model.configure_model()  # compiles when s.compile
        hp = model.hparams
        groups = param_groups(model, hp.weight_decay, hp.exclude_bias_norm)
        optimizer = build_optimizer(s.optimizer or hp.optimizer, groups, lr=1e-3, momentum=hp.momentum)
        if isinstance(optimizer, LARS):
            optimizer.foreach = s.lars_foreach
        next_views = view_source(s, device, args.workers)
    except Exception as err:  # a setting this tree or device lacks skips the row, not the benchmark
        variant.skipped = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        return variant
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[s.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=s.precision == "fp16")
    indices = torch.arange(s.batch, device=device)
    if getattr(model, "memory", None) is not None:  # PIRL: dataset indices within its memory bank
        indices = indices % model.memory.size
    encoders = model.momentum_encoders()

    def step() -> None:
        torch.backends.cudnn.benchmark = s.cudnn_benchmark
        views = next_views()
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            loss = model.ssl_step(views, indices).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        for encoder in encoders:
            encoder.update(0, 1000)

    def rest() -> int:
        optimizer.zero_grad(set_to_none=True)
        state = [t for per_param in optimizer.state.values() for t in per_param.values()]
        fixed_views = next_views() if s.augment_on == "none" else []
        return _tensor_bytes([*model.parameters(), *model.buffers(), *state, *fixed_views])

    variant.step, variant.rest = step, rest
    return variant


def optimizer_variant(name: str, mode: str, s: TrainSettings, device: torch.device) -> Variant:
    """``optimizer.step()`` alone over ``s``'s model parameters: ``mode`` fused, foreach or loop."""
    from sslpipe.optim import LARS, param_groups

    variant = Variant(settings={**s.as_dict(), "optimizer": name, "mode": mode, "optimizer_only": True})
    if mode == "fused" and (name == "lars" or device.type != "cuda"):
        variant.skipped = "LARS has no fused kernel" if name == "lars" else "fused kernels need a CUDA device"
        return variant
    torch.manual_seed(0)
    model = build_method(s, {}).to(device)
    groups = param_groups(model, 1e-6)
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False)}[mode]
    if name == "lars":
        optimizer = LARS(groups, lr=0.1, foreach=mode == "foreach")
    elif name == "sgd":
        optimizer = torch.optim.SGD([{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups], lr=0.1,
                                    momentum=0.9, **flags)  # fmt: skip
    else:
        optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups], lr=1e-3,
                                      **flags)  # fmt: skip
    variant.settings["parameter_tensors"] = len(params)
    variant.step = optimizer.step
    return variant


def compile_kwargs(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    backend = args.compile_backend or ("eager" if args.quick and device.type == "cpu" else "inductor")
    out: dict[str, Any] = {"backend": backend}
    if args.compile_mode:
        out["mode"] = args.compile_mode
    return out


def train_groups(args: argparse.Namespace, device: torch.device) -> list[tuple[str, list[TrainSettings]]]:
    """The compared tables of the ``train`` section, each a list of settings timed together."""
    gpu = device.type == "cuda"
    size = args.image_size or (16 if args.quick else 32)
    batch = args.batch or (8 if args.quick else 128)
    base = TrainSettings(
        backbone=args.backbone, cifar_stem=args.cifar_stem, image_size=size, batch=batch, small_heads=args.quick
    )
    fast = "fp32" if args.quick and not gpu else "bf16"  # the methods' precision (bf16: GPUs, CPUs with bf16 units)

    def with_(**kw) -> TrainSettings:
        return TrainSettings(**{**base.__dict__, **kw})

    groups = [
        (
            "precision and memory format (SimCLR)",
            [with_(precision=p, channels_last=c) for p in ("fp32", "bf16") for c in (False, True)],
        ),
        (
            "every method",
            [
                with_(method=m, precision=fast, backbone=base.backbone if VIEWS[m] != "one" else args.vit_backbone)
                for m in args.methods
            ],
        ),
        ("model.compile (SimCLR)", [with_(precision=fast, channels_last=gpu, compile=c) for c in (False, True)]),
        ("data.augment_on (SimCLR)", [with_(precision=fast, augment_on=a) for a in ("none", "cpu", "device")]),
    ]
    if gpu:
        groups.append(
            ("cuDNN benchmark (SimCLR)", [with_(precision=fast, channels_last=True, cudnn_benchmark=b) for b in (0, 1)])
        )
    return groups


def run_train(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    entries = []
    for title, settings in train_groups(args, device):
        variants = [train_variant(s, device, args) for s in settings]
        for entry in measure(variants, device, args.iters, args.rounds):
            entries.append({"group": title, **entry})
        del variants
        _free(device)
    s = TrainSettings(backbone=args.optimizer_backbone, image_size=32, small_heads=args.quick)
    variants = [
        optimizer_variant(name, mode, s, device)
        for name, modes in (("lars", ("foreach", "loop")), ("sgd", ("fused", "foreach", "loop")))
        for mode in modes
    ]
    variants += [optimizer_variant("adamw", mode, s, device) for mode in ("fused", "foreach", "loop")]
    for entry in measure(variants, device, args.iters, args.rounds):
        entries.append({"group": f"optimiser step alone ({s.backbone} parameters)", **entry})
    _free(device)
    return entries


def _fmt(value: Optional[float], digits: int = 0, suffix: str = "") -> str:
    """``value`` with ``digits`` decimals (three significant digits below 100 when ``digits`` is 0); ``-`` if None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if digits == 0 and abs(value) < 100:
        return f"{value:.3g}{suffix}"
    return f"{value:,.{digits}f}{suffix}"


def train_markdown(entries: list[dict[str, Any]]) -> str:
    """The ``train`` entries as one table per group, ratios against the group's first row."""
    out = []
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(e["group"], []).append(e)
    for title, rows in groups.items():
        optimizer_only = rows[0].get("optimizer_only", False)
        varying = [k for k in rows[0] if k not in ("group", "step_ms", "images_per_s", "peak_mib", "skipped")]
        varying = [k for k in varying if len({json.dumps(r.get(k)) for r in rows}) > 1]
        fixed = {k: v for k, v in rows[0].items() if k not in varying and k not in ("group", "step_ms")}
        fixed = {k: v for k, v in fixed.items() if k not in ("images_per_s", "peak_mib", "skipped", "optimizer_only")}
        settings = ", ".join(f"{k}={'method default' if v is None else v}" for k, v in fixed.items())
        out.append(f"#### {title}\n\n{settings}\n")
        first = next((r for r in rows if "step_ms" in r), None)
        if optimizer_only:
            out.append("| " + " | ".join(varying) + " | ms per step | vs first |")
            out.append("|" + "---|" * (len(varying) + 2))
        else:
            out.append("| " + " | ".join(varying) + " | images/s | vs first | peak MiB |")
            out.append("|" + "---|" * (len(varying) + 3))
        for r in rows:
            cells = [str(r.get(k)) for k in varying]
            if "skipped" in r:
                out.append(
                    "| " + " | ".join(cells + [f"skipped: {r['skipped']}"] + [""] * (1 + (not optimizer_only))) + " |"
                )
            elif optimizer_only:
                ratio = first["step_ms"] / r["step_ms"]
                out.append("| " + " | ".join(cells) + f" | {r['step_ms']:.3f} | {ratio:.2f}x |")
            else:
                ratio = r["images_per_s"] / first["images_per_s"]
                out.append(
                    "| " + " | ".join(cells) + f" | {_fmt(r['images_per_s'])} | {ratio:.2f}x | {_fmt(r['peak_mib'])} |"
                )
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- loss section
def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """The textbook form: 2N x 2N cosine matrix, then one cross entropy per anchor in a Python loop."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    sim = F.cosine_similarity(z[:, None, :], z[None, :, :], dim=-1) / t
    losses = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        losses.append(-sim[i, j] + torch.logsumexp(others, 0))
    return torch.stack(losses).mean()


def gathered_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """The vectorised form common in public SimCLR code: positives off the two N-th diagonals, the 2N-2
    negatives of every row boolean-indexed into a (2N, 2N-2) copy, cross entropy with label 0."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / t
    positives = torch.cat([torch.diagonal(sim, n), torch.diagonal(sim, -n)]).unsqueeze(1)
    keep = ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
    keep[torch.arange(2 * n), (torch.arange(2 * n) + n) % (2 * n)] = False
    negatives = sim[keep].view(2 * n, 2 * n - 2)
    logits = torch.cat([positives, negatives], dim=1)
    return F.cross_entropy(logits, torch.zeros(2 * n, dtype=torch.long, device=z.device))


def run_loss_peers(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """``nt_xent_loss`` vs the gathered form vs the loop, forward + backward, d = 128, interleaved."""
    from sslpipe.losses import nt_xent_loss

    entries = []
    for n in (32, 64) if args.quick else (64, 256, 1024, 4096):
        z1 = torch.randn(n, 128, device=device, requires_grad=True)
        z2 = torch.randn(n, 128, device=device, requires_grad=True)
        forms = {"sslpipe": nt_xent_loss, "gathered": gathered_nt_xent}
        if n <= 256:
            forms["loop"] = naive_nt_xent
        reference = nt_xent_loss(z1, z2, 0.1).item()
        variants = []
        for name, fn in forms.items():
            diff = abs(fn(z1, z2, 0.1).item() - reference)
            variants.append(
                Variant(
                    settings={"n": n, "d": 128, "form": name, "max_abs_diff": diff},
                    step=lambda fn=fn, z1=z1, z2=z2: fn(z1, z2, 0.1).backward(),
                )
            )
        entries += measure(variants, device, args.iters, args.rounds)
    return entries


def loss_peers_markdown(entries: list[dict[str, Any]]) -> str:
    rows = [
        "| batch N | sslpipe ms | gathered ms | gathered / sslpipe | loop ms | loop / sslpipe | max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in sorted({e["n"] for e in entries}):
        by = {e["form"]: e for e in entries if e["n"] == n}
        a = by["sslpipe"]["step_ms"]
        g = by["gathered"].get("step_ms")
        loop = by.get("loop", {}).get("step_ms")
        diff = max(e["max_abs_diff"] for e in by.values())
        rows.append(
            f"| {n} | {a:.2f} | {_fmt(g, 2)} | {_fmt(g and g / a, 1, 'x')} | {_fmt(loop, 1)} | "
            f"{_fmt(loop and loop / a, 0, 'x')} | {diff:.1e} |"
        )
    return "\n".join(rows)


def run_loss(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"entries": [{"table": "peers", **e} for e in run_loss_peers(args, device)]}
    module, why = _script("bench_loss")
    if module is None:
        out["skipped_tiled"] = why
        return out
    block = getattr(importlib.import_module("sslpipe.losses"), "AUTO_BLOCK", None)
    ns = [256, 1024] if args.quick else [256, 1024, 4096, 16384, 65536]
    # N = 65,536 on a CPU is ~3 TFLOP per tiled step: minutes per round; a CPU run stops at --loss_max_n
    max_n = args.loss_max_n or (65536 if device.type == "cuda" else 16384)
    ns = [n for n in ns if n <= max_n]
    rows = _call(module.run, ns=ns, d=128, device=device, block=block, warmup=1, iters=args.iters)
    out["entries"] += [{"table": "tiled", **r} for r in rows]
    if hasattr(module, "markdown"):
        out["markdown_tiled"] = _call(module.markdown, rows=rows, results=rows, block=block)
    return out


# ---------------------------------------------------------------------------------------------- augment section
def run_augment_recipes(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per-sample SimCLR views (torchvision v2) of one image per second on one core, three recipes."""
    import numpy as np
    from PIL import Image

    from sslpipe.augment import SimCLRViews

    size = 32
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    recipes = [
        ("SimCLR ImageNet defaults (jitter, grey, blur)", {}),
        ("no blur (CIFAR recipe)", {"blur_p": 0.0}),
        ("digits demo (crop + brightness/contrast)", dict(saturation=0.0, hue=0.0, grayscale_p=0.0, blur_p=0.0)),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        variants = []
        for name, kwargs in recipes:
            try:
                transform = SimCLRViews(**kwargs).build(size, MEAN, STD)
                variants.append(Variant({"recipe": name, "image_size": size}, lambda t=transform: t(image), images=1))
            except TypeError as err:  # a recipe knob renamed in this tree
                variants.append(Variant({"recipe": name, "image_size": size}, skipped=str(err)))
            variants[-1].warmup = 5
        return measure(variants, torch.device("cpu"), 10 if args.quick else 100, args.rounds)
    finally:
        torch.set_num_threads(threads)


def run_augment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"entries": [{"table": "recipes", **e} for e in run_augment_recipes(args)]}
    module, why = _script("bench_augment")
    if module is None:
        out["skipped_batched"] = why
        return out
    sizes = [32] if args.quick else [32, 224]
    rows = _call(
        module.run, sizes=sizes, device=str(device), iters=args.iters, warmup=1, batch=16 if args.quick else None
    )
    out["entries"] += [{"table": "batched", **r} for r in rows]
    if hasattr(module, "markdown"):
        out["markdown_batched"] = _call(module.markdown, results=rows, rows=rows)
    return out


def augment_recipes_markdown(entries: list[dict[str, Any]]) -> str:
    rows = ["| recipe (one core, 2 views per image) | images/s | views/s |", "|---|---|---|"]
    for e in entries:
        if "skipped" in e:
            rows.append(f"| {e['recipe']} | skipped: {e['skipped']} | |")
        else:
            rows.append(f"| {e['recipe']} | {_fmt(e['images_per_s'])} | {_fmt(2 * e['images_per_s'])} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- probe section
def run_probe(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    module, why = _script("bench_probe")
    if module is None:
        return {"entries": [], "skipped": why}
    if args.quick:
        sizes, probes, epochs = [(1024, 64, 10)], 4, 1
    elif device.type == "cuda":
        sizes, probes, epochs = [(50_000, 512, 100), (50_000, 2048, 1000), (200_000, 2048, 1000)], 8, 2
    else:
        sizes, probes, epochs = [(4_096, 128, 10), (8_192, 512, 100)], 8, 2
    entries = []
    for n, d, classes in sizes:
        r = _call(module.run, n=n, d=d, classes=classes, probes=probes, epochs=epochs, device=str(device))
        entries.append({**r.pop("settings", {}), **r})
    return {"entries": entries}


def probe_markdown(entries: list[dict[str, Any]]) -> str:
    rows = [
        "| n | d | classes | probes | batched s | sequential s | sequential / batched |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        rows.append(
            f"| {e['n']:,} | {e['d']} | {e['classes']} | {e['probes']} | {e['batched_s']:.2f} | "
            f"{e['sequential_s']:.2f} | {e['ratio']:.1f}x |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- gpu section
def largest_loss_batch(device: torch.device, block: Any, cap: int, d: int = 128) -> dict[str, Any]:
    """Double N (images; 2N anchors) until NT-Xent forward + backward runs out of memory or reaches ``cap``."""
    from sslpipe.losses import nt_xent_loss

    kwargs = {} if block == "direct" else {"block": block}
    if block == "direct" and "block" in inspect.signature(nt_xent_loss).parameters:
        kwargs = {"block": None}
    sync = synchronizer(device)
    fits, seconds, n = None, None, 1024
    while n <= cap:
        try:
            z1 = torch.randn(n, d, device=device, requires_grad=True)
            z2 = torch.randn(n, d, device=device, requires_grad=True)
            sync()
            start = time.perf_counter()
            nt_xent_loss(z1, z2, 0.1, **kwargs).backward()
            sync()
            fits, seconds = n, time.perf_counter() - start
        except torch.OutOfMemoryError:
            break
        finally:
            z1 = z2 = None
            _free(device)
        n *= 2
    return {"form": "direct" if block == "direct" else f"tiled (block {block})", "largest_n": fits, "cap": cap,
            "seconds_at_largest": seconds, "reached_cap": fits is not None and fits * 2 > cap}  # fmt: skip


def run_gpu(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    entries = []
    quick = args.quick
    r50 = TrainSettings(
        backbone="resnet18" if quick else "resnet50",
        image_size=32 if quick else 224,
        batch=8 if quick else args.gpu_batch,
        precision="bf16",
        channels_last=True,
        small_heads=quick,
    )
    variants = [train_variant(TrainSettings(**{**r50.__dict__, "compile": c}), device, args) for c in (False, True)]
    peak = bf16_peak_tflops(device_name(device)) if device.type == "cuda" else None
    for e in measure(variants, device, args.iters, args.rounds):
        if "images_per_s" in e and e["backbone"] == "resnet50" and e["image_size"] == 224:
            e["tflops"] = e["images_per_s"] * SIMCLR_R50_GFLOP_PER_IMAGE / 1e3
            e["bf16_peak_tflops"] = peak
            e["share_of_peak"] = e["tflops"] / peak if peak else None
        entries.append({"table": "simclr_r50", **e})
    del variants
    _free(device)
    cifar = TrainSettings(
        backbone="resnet18",
        cifar_stem=True,
        image_size=32,
        batch=8 if quick else 512,
        precision="bf16",
        channels_last=True,
        small_heads=quick,
    )
    variants = [train_variant(TrainSettings(**{**cifar.__dict__, "augment_on": a}), device, args) for a in
                ("none", "cpu", "device")]  # fmt: skip
    entries += [{"table": "cifar_augment", **e} for e in measure(variants, device, args.iters, args.rounds)]
    del variants
    _free(device)
    if device.type != "cuda" and not quick:
        entries.append({"table": "loss_batch", "skipped": "the largest-batch search runs on a GPU only"})
        return entries
    losses = importlib.import_module("sslpipe.losses")
    cap = 1024 if quick else args.max_loss_batch
    entries.append({"table": "loss_batch", **largest_loss_batch(device, "direct", cap)})
    if hasattr(losses, "AUTO_BLOCK"):
        entries.append({"table": "loss_batch", **largest_loss_batch(device, losses.AUTO_BLOCK, cap)})
    else:
        entries.append({"table": "loss_batch", "skipped": "this tree has no tiled contrastive loss"})
    return entries


def gpu_markdown(entries: list[dict[str, Any]]) -> str:
    out = ["#### SimCLR ResNet-50, 224 px, bf16, channels-last (2 views per image)", ""]
    out += ["| compile | batch | images/s | TFLOP/s (48.6 GFLOP/image) | bf16 dense peak (vendor) | share of peak |"]
    out += ["|---|---|---|---|---|---|"]
    for e in (e for e in entries if e["table"] == "simclr_r50"):
        if "skipped" in e:
            out.append(f"| {e['compile']} | {e['batch']} | skipped: {e['skipped']} | | | |")
            continue
        share = e.get("share_of_peak")
        out.append(
            f"| {e['compile']} | {e['batch']} | {_fmt(e['images_per_s'])} | {_fmt(e.get('tflops'), 1)} | "
            f"{_fmt(e.get('bf16_peak_tflops'))} | {_fmt(share and 100 * share, 1, '%')} |"
        )
    out += ["", "#### SimCLR ResNet-18 (CIFAR stem), 32 px, bf16: where the augmentation runs", ""]
    out += ["| augment_on | batch | images/s | peak MiB |", "|---|---|---|---|"]
    for e in (e for e in entries if e["table"] == "cifar_augment"):
        if "skipped" in e:
            out.append(f"| {e['augment_on']} | {e['batch']} | skipped: {e['skipped']} | |")
        else:
            out.append(f"| {e['augment_on']} | {e['batch']} | {_fmt(e['images_per_s'])} | {_fmt(e['peak_mib'])} |")
    out += ["", "#### Largest NT-Xent batch that fits (forward + backward, d = 128, one device)", ""]
    out += ["| form | largest N (images) | 2N anchors | seconds at that N |", "|---|---|---|---|"]
    for e in (e for e in entries if e["table"] == "loss_batch"):
        if "skipped" in e:
            out.append(f"| - | skipped: {e['skipped']} | | |")
            continue
        n = e["largest_n"]
        bound = ">= " if e["reached_cap"] else ""
        out.append(
            f"| {e['form']} | {bound}{_fmt(n)} | {bound}{_fmt(n and 2 * n)} | {_fmt(e['seconds_at_largest'], 2)} |"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- report
def section_markdown(name: str, section: dict[str, Any]) -> str:
    """One section of the report (printed after it runs, and in the README section)."""
    entries = section.get("entries", [])
    parts = []
    if name == "train":
        parts.append(train_markdown(entries))
    elif name == "loss":
        parts.append("NT-Xent forward + backward, d = 128: sslpipe vs the gathered form vs one loss per anchor\n")
        parts.append(loss_peers_markdown([e for e in entries if e.get("table") == "peers"]))
        if section.get("markdown_tiled"):
            parts.append("\nDirect vs tiled contrastive core (`scripts/bench_loss.py`)\n\n" + section["markdown_tiled"])
        elif section.get("skipped_tiled"):
            parts.append(f"\n(tiled core: {section['skipped_tiled']})")
    elif name == "augment":
        parts.append(augment_recipes_markdown([e for e in entries if e.get("table") == "recipes"]))
        if section.get("markdown_batched"):
            parts.append("\nPer-sample vs batched (`scripts/bench_augment.py`)\n\n" + section["markdown_batched"])
        elif section.get("skipped_batched"):
            parts.append(f"\n(batched augmentation: {section['skipped_batched']})")
    elif name == "probe":
        parts.append(section.get("skipped") or probe_markdown(entries))
    elif name == "gpu":
        parts.append(gpu_markdown(entries))
    return "\n".join(parts)


TITLES = {
    "train": "Training step",
    "loss": "Contrastive loss",
    "augment": "Augmentation",
    "probe": "Linear-probe sweep",
    "gpu": "GPU",
}


def readme_section(report: dict[str, Any]) -> str:
    """The README's performance section, generated from a benchmark JSON."""
    head = [
        "## Performance",
        "",
        f"Generated by `scripts/benchmark.py` on **{report['device']}** (torch {report['torch']}, "
        f"{report['threads']} threads, {report['date'][:10]}{', quick sizes' if report.get('quick') else ''}). "
        "Regenerate with `python scripts/benchmark.py --json bench.json` and "
        "`python scripts/benchmark.py --markdown README_SECTION.md --from bench.json`.",
        "Variants in one table were timed interleaved; ratios are against the table's first row.",
        "",
    ]
    body = []
    for name in SECTIONS:
        if name in report["sections"]:
            body += [f"### {TITLES[name]}", "", section_markdown(name, report["sections"][name]), ""]
    return "\n".join(head + body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--sections", default=None, help=f"comma-separated, from {','.join(SECTIONS)}")
    ap.add_argument("--gpu", action="store_true", help="add the gpu section")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that everything runs")
    ap.add_argument("--markdown", help="write the README performance section here")
    ap.add_argument("--from", dest="from_json", help="build --markdown from this JSON instead of running")
    ap.add_argument("--methods", default=",".join(METHODS), help="train section: methods of the 'every method' table")
    ap.add_argument("--backbone", default="resnet18", help="train section: backbone of the ResNet methods")
    ap.add_argument("--vit_backbone", default="vit_tiny_patch16_224", help="train section: the masked models'")
    ap.add_argument("--cifar_stem", action="store_true")
    ap.add_argument("--image_size", type=int, default=None, help="train section (default 32; --quick 16)")
    ap.add_argument("--batch", type=int, default=None, help="train section, per step (default 128; --quick 8)")
    ap.add_argument("--optimizer_backbone", default="resnet50", help="whose parameters the optimiser table steps")
    ap.add_argument(
        "--compile_backend", default=None, help="torch.compile backend (default inductor; --quick CPU eager)"
    )
    ap.add_argument("--compile_mode", default=None, help="torch.compile mode, e.g. max-autotune")
    ap.add_argument("--workers", type=int, default=None, help="loader workers for augment_on cpu/device")
    ap.add_argument("--gpu_batch", type=int, default=256, help="gpu section: SimCLR ResNet-50 batch")
    ap.add_argument("--max_loss_batch", type=int, default=1 << 21, help="gpu section: cap of the loss-batch search")
    ap.add_argument(
        "--loss_max_n", type=int, default=None, help="loss section: largest N (default GPU 65536, CPU 16384)"
    )
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None, help="steps per round")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (the median counts)")
    args = ap.parse_args()

    if args.from_json:
        if not args.markdown:
            ap.error("--from needs --markdown")
        with open(args.from_json) as f:
            report = json.load(f)
        with open(args.markdown, "w") as f:
            f.write(readme_section(report))
        print(f"wrote {args.markdown} from {args.from_json}")
        return

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sections = tuple(s for s in (args.sections or ",".join(DEFAULT_SECTIONS)).split(",") if s)
    if args.gpu and "gpu" not in sections:
        sections += ("gpu",)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    args.methods = [m for m in args.methods.split(",") if m]
    args.warmup = args.warmup if args.warmup is not None else 1 if args.quick else 2
    args.iters = args.iters if args.iters is not None else 2 if args.quick else 10
    args.rounds = args.rounds if args.rounds is not None else 1 if args.quick else 3
    if args.workers is None:
        args.workers = 0 if args.quick else max(1, min(8, (os.cpu_count() or 2) - 1))
    if args.quick:
        args.optimizer_backbone = "resnet18" if args.optimizer_backbone == "resnet50" else args.optimizer_backbone

    report: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "argv": sys.argv[1:],
        "sections": {},
    }
    print(f"# sslpipe benchmark: {report['device']}, torch {report['torch']}, {report['threads']} threads\n")
    runners = {"augment": run_augment, "loss": run_loss, "probe": run_probe}
    for name in SECTIONS:
        if name not in sections:
            continue
        if name == "train":
            section = {"entries": run_train(args, device)}
        elif name == "gpu":
            section = {"entries": run_gpu(args, device)}
        else:
            section = runners[name](args, device)
        report["sections"][name] = section
        print(f"## {TITLES[name]}\n\n{section_markdown(name, section)}\n", flush=True)
        if args.json:  # after every section: a later failure keeps what was measured
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(readme_section(report))


if __name__ == "__main__":
    main()
