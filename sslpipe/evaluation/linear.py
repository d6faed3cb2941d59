"""Linear probe on frozen features: the whole (lr, weight decay) sweep trained at once, chosen on held-out train data.

Choosing hyper-parameters on the validation split and then reporting that split inflates the number;
here they are chosen on a slice of the *training* data, and the validation split is scored once.

All probes of the sweep are one weight tensor ``(D, P, C)`` (stored so that a mini-batch is one
``(B, D) @ (D, P*C)`` product) with per-probe learning rates and weight decays: SGD with momentum 0.9,
decay on the weights only (not the biases), a cosine schedule; gradients are written out (softmax minus
one-hot), so each probe follows exactly the path a lone ``nn.Linear`` + ``torch.optim.SGD`` would take on
the same mini-batches. Features may be fp16 (the feature cache's dtype): they are standardised with the
training mean/std (as MAE's BatchNorm-without-affine probe) and upcast per mini-batch.

Two protocols:

* cached features (default): the sweep trains on ``1 - holdout_fraction`` of the training features and is
  scored on the rest; the chosen pair is retrained on all of them (a second, single-probe pass).
* ``augment``: random-resized crops (+ horizontal flips) of the training images through the frozen
  backbone (eval mode, BatchNorm statistics frozen), features computed on the fly, as in the papers'
  protocol. The backbone pass dominates the cost, so one pass trains 2P probes: P sweep probes that only
  learn from the non-held-out images of each batch (the held-out ones weigh 0 in their loss) and P final
  probes that learn from all; the sweep probes are scored on the held-out images' centre-crop features,
  and the final probe of the chosen pair is evaluated on the centre-crop val features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.evaluation.metrics import topk_hits
from sslpipe.optim import warmup_cosine
from sslpipe.progress import progress

# (features, labels, row weights (B, P) or None) per mini-batch
Batch = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


@dataclass
class LinearProbeResult:
    """Validation accuracy (percent) of the final probe and the hyper-parameters picked for it."""

    top1: float
    top5: float
    lr: float
    weight_decay: float
    sweep: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def feature_moments(x: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and (unbiased) standard deviation of ``x`` in fp32, accumulated in fp64 chunk by chunk."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].double()
        total += part.sum(0)
        total_sq += part.square().sum(0)
    n = len(x)
    mean = total / n
    var = (total_sq - n * mean.square()) / max(1, n - 1)
    return mean.float(), var.clamp_min(0).sqrt().float()


class LinearProbes:
    """``P`` linear classifiers on standardised features, trained together by SGD with momentum.

    ``weight`` is ``(D, P, C)`` and ``bias`` ``(P, C)``, both starting at zero. Each probe ``p`` has its own
    learning rate ``lrs[p]`` and weight decay ``weight_decays[p]`` (weights only; biases are not decayed).
    """

    def __init__(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        num_classes: int,
        lrs: Sequence[float],
        weight_decays: Sequence[float],
        momentum: float = 0.9,
        device: torch.device | str = "cpu",
    ) -> None:
        if len(lrs) != len(weight_decays) or not lrs:
            raise ValueError(f"need one weight decay per lr (and at least one), got {list(lrs)} and {weight_decays}")
        device = torch.device(device)
        dim, probes = mean.numel(), len(lrs)
        self.num_classes, self.momentum = num_classes, momentum
        self.mean = mean.float().to(device)
        self.inv_std = 1.0 / std.float().clamp_min(1e-6).to(device)
        self.weight = torch.zeros(dim, probes, num_classes, device=device)
        self.bias = torch.zeros(probes, num_classes, device=device)
        self._weight_momentum = torch.zeros_like(self.weight)
        self._bias_momentum = torch.zeros_like(self.bias)
        self.lrs = torch.tensor(list(lrs), dtype=torch.float32, device=device)
        self.weight_decays = torch.tensor(list(weight_decays), dtype=torch.float32, device=device)

    @property
    def num_probes(self) -> int:
        """How many probes are trained together."""
        return self.weight.shape[1]

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Upcast a batch of raw features to fp32 on the probes' device and standardise it."""
        return (x.to(self.mean.device, non_blocking=True).float() - self.mean) * self.inv_std

    def _logits(self, xs: torch.Tensor) -> torch.Tensor:
        dim, probes, classes = self.weight.shape
        return torch.addmm(self.bias.view(1, -1), xs, self.weight.view(dim, -1)).view(len(xs), probes, classes)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, P, C)`` class scores of every probe for a batch of raw features."""
        return self._logits(self.standardise(x))

    @torch.no_grad()
    def step(
        self, x: torch.Tensor, y: torch.Tensor, lr_scale: float, row_weights: Optional[torch.Tensor] = None
    ) -> None:
        """One SGD-with-momentum step of every probe on the mean cross-entropy of a batch.

        Args:
            x: ``(B, D)`` raw features; y: ``(B,)`` labels.
            lr_scale: the schedule's multiplier of every probe's learning rate at this step.
            row_weights: ``(B, P)``, 1 where probe ``p`` learns from row ``b`` and 0 where it does not; each
                probe's loss is the mean over its own rows. ``None``: every probe learns from every row.
        """
        xs = self.standardise(x)
        y = y.to(xs.device)
        dim, probes, classes = self.weight.shape
        # d(mean CE)/d(logits) = (softmax - one_hot) / rows
        grad = self._logits(xs).softmax(dim=-1) - F.one_hot(y, classes).to(xs.dtype).unsqueeze(1)
        if row_weights is None:
            grad = grad / len(xs)
        else:
            w = row_weights.to(xs.device, xs.dtype)
            grad = grad * (w / w.sum(0).clamp_min(1)).unsqueeze(-1)
        grad_weight = (xs.T @ grad.reshape(len(xs), -1)).view(dim, probes, classes)
        grad_weight += self.weight_decays.view(1, -1, 1) * self.weight  # L2 decay, as torch.optim.SGD
        self._weight_momentum.mul_(self.momentum).add_(grad_weight)
        self._bias_momentum.mul_(self.momentum).add_(grad.sum(0))
        lr = lr_scale * self.lrs
        self.weight.sub_(lr.view(1, -1, 1) * self._weight_momentum)
        self.bias.sub_(lr.view(-1, 1) * self._bias_momentum)

    @torch.no_grad()
    def accuracy(
        self, x: torch.Tensor, y: torch.Tensor, ks: tuple[int, ...] = (1,), chunk: int = 8192
    ) -> dict[int, torch.Tensor]:
        """Top-k accuracy (percent) of every probe on ``(x, y)``: ``{k: (P,) tensor}``, scored chunk by chunk."""
        hits = {k: torch.zeros(self.num_probes, device=self.mean.device) for k in ks}
        for start in range(0, len(x), chunk):
            scores = self.logits(x[start : start + chunk])
            labels = y[start : start + chunk].to(scores.device).long()
            for k in ks:
                hits[k] += topk_hits(scores, labels, k).sum(0)
        return {k: (100 * h / max(1, len(x))).cpu() for k, h in hits.items()}

    def probe(self, p: int) -> nn.Linear:
        """Probe ``p`` as an ``nn.Linear`` on standardised features (``weight`` ``(C, D)``)."""
        dim, _, classes = self.weight.shape
        linear = nn.Linear(dim, classes)
        with torch.no_grad():
            linear.weight.copy_(self.weight[:, p].T)
            linear.bias.copy_(self.bias[p])
        return linear


def train_probes(probes: LinearProbes, epochs: int, batches: Callable[[int], Iterable[Batch]], steps: int) -> None:
    """Run ``epochs`` epochs of ``batches(epoch)`` (``steps`` mini-batches each) through ``probes.step``.

    The learning rates follow a cosine from their set values to 0 over all steps, no warm-up.
    """
    total, step = max(1, epochs * steps), 0
    for epoch in progress(range(epochs), desc=f"linear probes x{probes.num_probes}"):
        for x, y, row_weights in batches(epoch):
            probes.step(x, y, warmup_cosine(step, 0, total), row_weights)
            step += 1


def _placed(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` when it fits in half the free memory there, else on the host (streamed per batch)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if x.element_size() * x.numel() < free // 2:
            return x.to(device)
        return x.pin_memory() if not x.is_pinned() else x
    return x.to(device)


def fit_linear_probes(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    epochs: int,
    batch_size: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    rows: Optional[torch.Tensor] = None,
    moments: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> LinearProbes:
    """Train one probe per ``(lrs[p], weight_decays[p])`` on ``features[rows]``, all at once.

    Mini-batches (the same for every probe): each epoch draws ``order = torch.randperm(len(rows), generator=g)``
    from ``g = torch.Generator().manual_seed(seed)`` (one generator for the whole run) and takes
    ``rows[order[i : i + batch_size]]`` for ``i = 0, batch_size, ...``.

    Args:
        features: ``(N, D)``, any float dtype (fp16 stays fp16 until each batch is upcast).
        rows: which rows to train on (default: all).
        moments: the standardisation ``(mean, std)`` (default: of ``features``).
    """
    device = torch.device(device)
    mean, std = moments if moments is not None else feature_moments(features)
    probes = LinearProbes(mean, std, num_classes, lrs, weight_decays, device=device)
    x = _placed(features, device)
    y = labels.long().to(x.device)
    rows = (torch.arange(len(x)) if rows is None else rows.long().cpu()).to(x.device)
    generator = torch.Generator().manual_seed(seed)

    def batches(epoch: int) -> Iterator[Batch]:
        order = rows[torch.randperm(len(rows), generator=generator).to(x.device)]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx], None

    train_probes(probes, epochs, batches, -(-len(rows) // batch_size))
    return probes


@dataclass
class FrozenEncoder:
    """What the augmented probe needs to compute training features on the fly.

    Attributes:
        model: the frozen backbone (its ``forward`` gives the evaluation features); run in eval mode.
        data: the :class:`~sslpipe.data.SSLDataModule` whose ``train`` split the cached features came from.
        device, precision: where and how the backbone runs (Lightning precision string).
    """

    model: nn.Module
    data: Any
    device: torch.device | str = "cpu"
    precision: str = "32-true"


def augmented_train_loader(
    data: Any, batch_size: int, crop_scale: tuple[float, float], hflip: bool, seed: int
) -> torch.utils.data.DataLoader:
    """Shuffled ``(image, label, index)`` batches of the ``train`` split with random-resized crops (+ flips).

    The crop is resized to the data's image size and normalised with its mean/std, as the evaluation
    transform; shuffling and the workers' augmentation seeds come from ``seed``.
    """
    from sslpipe.augment.simclr import SimCLRAugment, simclr_transform
    from sslpipe.data.datasets import IndexedDataset

    aug = SimCLRAugment(
        crop_scale=tuple(crop_scale),
        hflip_p=0.5 if hflip else 0.0,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
    )
    transform = simclr_transform(aug, data.image_size, data.mean, data.std)
    return torch.utils.data.DataLoader(
        IndexedDataset(data.get_dataset("train", transform)),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=data.num_workers,
        pin_memory=data.pin_memory,
        persistent_workers=data.num_workers > 0,
    )


def _holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, int(fraction * n))
    return perm[:n_hold], perm[n_hold:]


def train_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float] = (0.01, 0.1, 1.0),
    weight_decays: Sequence[float] = (0.0, 1e-4),
    epochs: int = 100,
    batch_size: int = 256,
    holdout_fraction: float = 0.1,
    augment: bool = False,
    augment_crop_scale: tuple[float, float] = (0.08, 1.0),
    augment_hflip: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    encoder: Optional[FrozenEncoder] = None,
) -> LinearProbeResult:
    """Train linear classifiers on frozen features and report the chosen one's top-1/top-5 on validation.

    Every ``(lr, weight_decay)`` pair of the grid is trained on ``1 - holdout_fraction`` of the training
    set and scored on the rest; the best pair (the first in grid order on ties) is the one trained on all
    training data, evaluated once on validation. A single pair skips the sweep.

    Args:
        train_features, val_features: ``(N, D)`` centre-crop features (any float dtype; fp16 is upcast per batch).
        train_labels: ``-1`` marks unlabelled images (STL-10), which no probe trains on.
        epochs, batch_size: of every probe's SGD (cosine schedule, momentum 0.9).
        augment: train on features of random-resized crops computed on the fly by ``encoder`` (the papers'
            protocol; much slower) instead of the cached centre-crop features.
        augment_crop_scale: the crops' area range (Inception-style 0.08-1).
        augment_hflip: random horizontal flips; turn off where a mirrored image is another class (digits).
        encoder: the frozen backbone and data for ``augment`` (filled in by ``sslpipe linear``).
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if augment and encoder is None:
        raise ValueError("augment=True needs an encoder (the frozen backbone and its data) to compute features")
    device = torch.device(device)
    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    labelled = torch.nonzero(train_labels >= 0).flatten()  # unlabeled images cannot train a classifier
    moments = feature_moments(train_features)
    sweep: list[dict[str, float]] = []
    best = 0
    hold, fit = _holdout_split(len(labelled), holdout_fraction, seed) if len(grid) > 1 else (None, labelled)
    if hold is not None:
        hold, fit = labelled[hold], labelled[fit]

    def record(holdout_top1: torch.Tensor) -> int:
        scores = holdout_top1.tolist()
        sweep.extend({"lr": lr, "weight_decay": wd, "holdout_top1": acc} for (lr, wd), acc in zip(grid, scores))
        return max(range(len(grid)), key=lambda i: (scores[i], -i))  # first best in grid order

    lrs_grid, wds_grid = [lr for lr, _ in grid], [wd for _, wd in grid]
    if not augment:
        train = partial(
            fit_linear_probes, train_features, train_labels, num_classes, epochs=epochs, batch_size=batch_size,
            seed=seed, device=device, moments=moments,
        )  # fmt: skip
        if hold is not None:
            probes = train(lrs_grid, wds_grid, rows=fit)
            best = record(probes.accuracy(train_features[hold], train_labels[hold], (1,))[1])
        final = train([grid[best][0]], [grid[best][1]], rows=labelled)
        final_index = 0
    else:
        assert encoder is not None
        sweeping = hold is not None
        probe_lrs, probe_wds = (lrs_grid * 2, wds_grid * 2) if sweeping else (lrs_grid, wds_grid)
        final = LinearProbes(*moments, num_classes, probe_lrs, probe_wds, device=device)
        in_fit = torch.zeros(len(train_labels), dtype=torch.bool)
        in_fit[fit] = True
        loader = augmented_train_loader(encoder.data, batch_size, augment_crop_scale, augment_hflip, seed)

        def batches(epoch: int) -> Iterator[Batch]:
            from sslpipe.evaluation.features import feature_batches

            for x, y, idx in feature_batches(encoder.model, loader, encoder.device, encoder.precision):
                y = torch.as_tensor(y)
                has_label = (y >= 0).float()
                weights = has_label[:, None].expand(-1, final.num_probes).clone()
                if sweeping:
                    weights[:, : len(grid)] *= in_fit[idx].float()[:, None]
                yield x, y.clamp_min(0), weights

        train_probes(final, epochs, batches, len(loader))
        if sweeping:
            best = record(final.accuracy(train_features[hold], train_labels[hold], (1,))[1][: len(grid)])
        final_index = best + len(grid) if sweeping else 0
    acc = final.accuracy(val_features, val_labels, (1, 5))
    lr, wd = grid[best]
    return LinearProbeResult(
        top1=float(acc[1][final_index]), top5=float(acc[5][final_index]), lr=lr, weight_decay=wd, sweep=sweep
    )
