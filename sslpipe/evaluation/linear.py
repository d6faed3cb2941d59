"""Linear probe on cached frozen features, with learning-rate / weight-decay chosen on held-out training data.

Choosing hyper-parameters on the validation split and then reporting that split inflates the number;
here they are chosen on a slice of the *training* features, then the probe is retrained on all of
them and evaluated once on validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.evaluation.metrics import topk_accuracy
from sslpipe.optim import warmup_cosine
from sslpipe.progress import progress


@dataclass
class LinearProbeResult:
    """Validation accuracy (percent) of the final probe and the hyper-parameters picked for it."""

    top1: float
    top5: float
    lr: float
    weight_decay: float
    sweep: list[dict[str, float]] = field(default_factory=list)


def _fit(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    seed: int,
) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, (len(x) + batch_size - 1) // batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 0, total))
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head


@torch.no_grad()
def _scores(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return head(x).cpu()


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
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LinearProbeResult:
    """Train a linear classifier on standardised features and report top-1/top-5 on validation.

    Features are standardised with the training mean/std (as MAE's BatchNorm-without-affine probe).
    Every ``(lr, weight_decay)`` pair is trained on ``1 - holdout_fraction`` of the training features
    and scored on the rest; the best pair is retrained on all training features. A single pair skips
    the sweep.
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    device = torch.device(device)
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    xtr = ((train_features - mean) / std).to(device)
    xva = ((val_features - mean) / std).to(device)
    ytr, yva = train_labels.long().to(device), val_labels.long().cpu()
    if (ytr < 0).any():
        keep = ytr >= 0  # unlabeled samples (STL-10) cannot train a classifier
        xtr, ytr = xtr[keep], ytr[keep]

    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    sweep: list[dict[str, float]] = []
    best = grid[0]
    if len(grid) > 1:
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed)).to(device)
        n_hold = max(1, int(holdout_fraction * len(xtr)))
        hold, fit = perm[:n_hold], perm[n_hold:]
        best_acc = -1.0
        for lr, wd in progress(grid, desc="linear probe sweep"):
            head = _fit(xtr[fit], ytr[fit], num_classes, lr, wd, epochs, batch_size, seed)
            acc = 100 * topk_accuracy(_scores(head, xtr[hold]), ytr[hold].cpu(), (1,))[1]
            sweep.append({"lr": lr, "weight_decay": wd, "holdout_top1": acc})
            if acc > best_acc:
                best_acc, best = acc, (lr, wd)
    head = _fit(xtr, ytr, num_classes, best[0], best[1], epochs, batch_size, seed)
    acc = topk_accuracy(_scores(head, xva), yva, (1, 5))
    return LinearProbeResult(top1=100 * acc[1], top5=100 * acc[5], lr=best[0], weight_decay=best[1], sweep=sweep)
