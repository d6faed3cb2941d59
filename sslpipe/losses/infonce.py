"""InfoNCE losses of MoCo: v1/v2 against a queue of negatives, v3 against the global batch of keys.

Energy view: E(q, k) = -cos(q, k) / tau. The loss is a softmax classification of the positive key
among the negatives, so it lowers the positive's energy and raises the negatives'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.distributed import gather_with_grad, rank, world_size


def infonce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Logits ``(N, 1 + K)`` of MoCo v2: column 0 is ``cos(q_i, k_i) / tau``, then ``cos(q_i, queue_j) / tau``.

    ``q`` and ``k`` ``(N, d)`` are L2-normalised here; ``queue`` ``(K, d)`` is used as given (MoCo
    stores unit keys). Always fp32: a cosine over a small tau exceeds bf16's resolution.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if q.shape != k.shape or q.ndim != 2 or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"need q, k of shape (N, d) and queue (K, d); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(queue.shape)}"
        )
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        positive = (q * k).sum(dim=1, keepdim=True)
        negatives = q @ queue.float().T
        return torch.cat([positive, negatives], dim=1) / temperature


def infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo v2 InfoNCE: mean cross entropy of picking each query's key among 1 positive + K queue negatives.

    Args:
        q: ``(N, d)`` queries (gradient flows through them).
        k: ``(N, d)`` positive keys from the momentum encoder (treated as constants by the caller).
        queue: ``(K, d)`` unit negatives; pass a copy if the queue is written before ``backward``.
        temperature: tau (MoCo v2: 0.2).
    """
    logits = infonce_logits(q, k, queue, temperature)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, gather: bool = True) -> torch.Tensor:
    """One direction of MoCo v3's loss: query i against every key of the global batch, positive = its own key.

    ``CE(q @ k_all.T / tau, labels = arange(N) + rank * N) * 2 * tau``. The ``2 * tau`` factor is the
    paper's: it makes the gradient's scale independent of tau. The method sums the two directions
    ``(q1, k2)`` and ``(q2, k1)``. Keys are gathered with :func:`gather_with_grad`, so a caller whose
    keys carry gradients gets them back on their rank; momentum-encoder keys carry none.

    Args:
        q: ``(N, d)`` predictions of this rank's images (L2-normalised here).
        k: ``(N, d)`` keys of the other view of the same images (L2-normalised here).
        temperature: tau (MoCo v3: 0.2 for ViT, 1.0 for ResNet).
        gather: under torch.distributed, take the keys of every rank; ``False`` uses this rank's only.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if q.shape != k.shape or q.ndim != 2:
        raise ValueError(f"q and k must be (N, d) of equal shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        keys = gather_with_grad(k) if gather else k  # (W*N, d): rank r's keys at rows [r*N, (r+1)*N)
        logits = q @ keys.T / temperature
        offset = rank() * q.shape[0] if gather and world_size() > 1 else 0
        labels = offset + torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, labels) * (2 * temperature)


class InfoNCELoss(nn.Module):
    """Module form of :func:`infonce_loss` holding the temperature."""

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        """Loss of queries ``q`` against their keys ``k`` and the negatives ``queue``."""
        return infonce_loss(q, k, queue, self.temperature)
