"""Classification metrics shared by the probes."""

from __future__ import annotations

import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Share of rows whose label is among the ``k`` highest scores, for each ``k`` (capped at the class count)."""
    out = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        top = scores.topk(k_eff, dim=1).indices
        out[k] = (top == labels[:, None]).any(dim=1).float().mean().item()
    return out
