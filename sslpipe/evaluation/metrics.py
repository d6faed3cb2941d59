"""Classification metrics shared by the probes."""

from __future__ import annotations

import torch


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``scores.shape[:-1]``: whether the label is among the ``k`` highest scores (classes on the last dim).

    ``scores`` may carry extra dims between the rows and the classes (e.g. ``(N, probes, C)``); ``labels`` is
    ``(N,)``. ``k`` is capped at the class count.
    """
    top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    shape = (labels.shape[0],) + (1,) * (scores.dim() - 1)
    return (top == labels.reshape(shape)).any(dim=-1)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Share of rows whose label is among the ``k`` highest scores, for each ``k`` (capped at the class count)."""
    return {k: topk_hits(scores, labels, k).float().mean().item() for k in ks}
