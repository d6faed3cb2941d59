"""InfoNCE losses of MoCo: against a queue of negatives (v1/v2) and against the batch of keys (v3).

Energy view: E(q, k) = -cos(q, k) / tau. The loss is a softmax classification of the positive key
among the negatives, so it lowers the positive's energy and raises the negatives'.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from sslpipe.distributed import gather_with_grad, rank, world_size
from sslpipe.losses.contrastive import ContrastiveBlock, check_pair, contrastive_row_losses

LossAndStats = Union[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _mean(out: LossAndStats, return_stats: bool) -> LossAndStats:
    return (out[0].mean(), out[1]) if return_stats else out.mean()


def infonce_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    temperature: float = 0.2,
    block: ContrastiveBlock = None,
    return_stats: bool = False,
) -> LossAndStats:
    """MoCo v2 InfoNCE: mean cross entropy of picking each query's key among 1 positive + K queue negatives.

    Args:
        q: ``(N, d)`` queries (gradient flows through them).
        k: ``(N, d)`` positive keys from the momentum encoder (treated as constants by the caller).
        queue: ``(K, d)`` negatives (normalised here; no gradient flows into them); pass a copy if the queue
            is written before ``backward``.
        temperature: tau (MoCo v2: 0.2).
        block: direct (``None``), tiled (an int) or ``"auto"``; see :mod:`sslpipe.losses.contrastive`.
        return_stats: also return the energies and pretext top-1 (the positive beats every queue entry).
    """
    check_pair(q, k, "q and k")
    out = contrastive_row_losses(q, queue.detach(), temperature, positives=k, block=block, return_stats=return_stats)
    return _mean(out, return_stats)


def batch_infonce_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    temperature: float = 0.2,
    gather: bool = True,
    block: ContrastiveBlock = None,
    return_stats: bool = False,
) -> LossAndStats:
    """InfoNCE of each query against every key of the global batch, its own key being the positive.

    ``CE(q @ k_all.T / tau, labels = arange(N) + rank * N)``: one direction of MoCo v3's loss, which sums
    ``(q1, k2)`` and ``(q2, k1)`` and multiplies by ``2 * tau`` (the method applies that factor). Keys are
    gathered with :func:`gather_with_grad`, so a caller whose keys carry gradients gets them back on their
    rank; momentum-encoder keys carry none.

    Args:
        q: ``(N, d)`` predictions of this rank's images (L2-normalised here).
        k: ``(N, d)`` keys of the other view of the same images (L2-normalised here).
        temperature: tau (MoCo v3: 0.2 for ViT, 1.0 for ResNet).
        gather: under torch.distributed, take the keys of every rank; ``False`` uses this rank's only.
        block: direct (``None``), tiled (an int) or ``"auto"``; see :mod:`sslpipe.losses.contrastive`.
        return_stats: also return the energies and pretext top-1 of this rank's queries.
    """
    check_pair(q, k, "q and k")
    with torch.autocast(device_type=q.device.type, enabled=False):
        k = F.normalize(k.float(), dim=1)
        keys = gather_with_grad(k) if gather else k  # (W*N, d): rank r's keys at rows [r*N, (r+1)*N)
        offset = rank() * q.shape[0] if gather and world_size() > 1 else 0
        labels = offset + torch.arange(q.shape[0], device=q.device)
        out = contrastive_row_losses(q, keys, temperature, pos_col=labels, block=block, return_stats=return_stats)
    return _mean(out, return_stats)
