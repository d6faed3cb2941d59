"""PIRL's losses against memory-bank negatives: noise-contrastive estimation (the paper's) and InfoNCE.

With ``s`` the cosine similarity and ``tau`` the temperature, PIRL scores a (query, memory) pair by
the NCE posterior that it is a data pair rather than one of ``|D_N|`` noise samples drawn uniformly
from the ``|D|`` slots::

    h(u, v) = (exp(s/tau) / Z) / (exp(s/tau) / Z + |D_N| / |D|) = sigmoid(s/tau - log Z - log(|D_N| / |D|))

so ``-log h`` and ``-log(1 - h)`` are log-sigmoids: stable for any ``s/tau``. ``Z`` (the partition
function estimate of Wu et al., 2018) is fixed after the first batch; the caller owns it, which
keeps these functions pure. The InfoNCE form replaces ``h`` by a softmax over the positive and
the negatives. All math is fp32 whatever the surrounding autocast.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

PIRLLossForm = Literal["nce", "infonce"]


def _logits(
    query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s/tau`` of each query with its positive ``(B,)`` and with every negative ``(B, K)``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if query.ndim != 2 or query.shape != positive.shape or negatives.ndim != 2 or negatives.shape[1] != query.shape[1]:
        raise ValueError(
            f"expected query and positive (B, d) and negatives (K, d), got {tuple(query.shape)}, "
            f"{tuple(positive.shape)}, {tuple(negatives.shape)}"
        )
    q = F.normalize(query.float(), dim=1)
    pos = (q * F.normalize(positive.float(), dim=1)).sum(1) / temperature
    neg = q @ F.normalize(negatives.float(), dim=1).T / temperature
    return pos, neg


def _mask(neg_mask: Optional[torch.Tensor], shape: torch.Size, device: torch.device) -> torch.Tensor:
    if neg_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if neg_mask.shape != shape:
        raise ValueError(f"neg_mask must be (B, K) = {tuple(shape)}, got {tuple(neg_mask.shape)}")
    return neg_mask.bool()


def estimate_nce_log_z(
    query: torch.Tensor,
    negatives: torch.Tensor,
    num_data: int,
    temperature: float = 0.07,
    neg_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``log Z`` with ``Z = |D| * mean exp(s/tau)`` over the (masked) negatives of one batch (a 0-dim tensor)."""
    with torch.autocast(device_type=query.device.type, enabled=False):
        _, neg = _logits(query, query, negatives, temperature)
        mask = _mask(neg_mask, neg.shape, neg.device)
        count = mask.sum().clamp_min(1)
        return (
            torch.logsumexp(neg.masked_fill(~mask, float("-inf")).flatten(), 0)
            - count.float().log()
            + math.log(num_data)
        )


def pirl_nce_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    log_z: Union[float, torch.Tensor],
    num_data: int,
    temperature: float = 0.07,
    neg_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """PIRL's NCE loss ``-log h(m_I, q) - sum_{I' in D_N} log(1 - h(q, m_I'))``, averaged over the batch.

    Args:
        query: ``(B, d)`` embeddings (``g(v_{I^t})`` or ``f(v_I)``).
        positive: ``(B, d)`` memory-bank entries ``m_I`` of the same images.
        negatives: ``(K, d)`` memory-bank entries shared by the batch.
        log_z: log of the NCE normaliser ``Z`` (see :func:`estimate_nce_log_z`).
        num_data: ``|D|``, the number of slots the negatives were drawn from.
        temperature: ``tau``.
        neg_mask: ``(B, K)`` bool, True where negative k belongs to row b's ``D_N``; ``|D_N|`` is its
            row count. ``None``: every negative for every row.
    """
    with torch.autocast(device_type=query.device.type, enabled=False):
        pos, neg = _logits(query, positive, negatives, temperature)
        mask = _mask(neg_mask, neg.shape, neg.device)
        log_noise = mask.sum(1).float().log() - math.log(num_data)  # log(|D_N| / |D|) per row
        shift = torch.as_tensor(log_z, dtype=torch.float32, device=pos.device) + log_noise  # (B,)
        pos_term = -F.logsigmoid(pos - shift)
        neg_term = -F.logsigmoid(shift[:, None] - neg)  # -log(1 - h) = -log sigmoid(-x)
        return (pos_term + neg_term.masked_fill(~mask, 0.0).sum(1)).mean()


def pirl_infonce_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.07,
    neg_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``-log [exp(s(m_I,q)/tau) / (exp(s(m_I,q)/tau) + sum_{I' in D_N} exp(s(q,m_I')/tau))]``, batch mean.

    Arguments as in :func:`pirl_nce_loss`; a cross-entropy over ``[positive, masked negatives]`` logits.
    """
    with torch.autocast(device_type=query.device.type, enabled=False):
        pos, neg = _logits(query, positive, negatives, temperature)
        mask = _mask(neg_mask, neg.shape, neg.device)
        logits = torch.cat([pos[:, None], neg.masked_fill(~mask, float("-inf"))], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=pos.device))


class PIRLLoss(nn.Module):
    """``lambda * L(m_I, g(v_{I^t})) + (1 - lambda) * L(m_I, f(v_I))`` with ``L`` the NCE or InfoNCE form.

    Args:
        form: ``nce`` (PIRL's) or ``infonce``.
        temperature: ``tau`` (PIRL: 0.07).
        loss_weight: ``lambda``, the jigsaw term's weight (PIRL: 0.5).
    """

    def __init__(self, form: PIRLLossForm = "nce", temperature: float = 0.07, loss_weight: float = 0.5) -> None:
        super().__init__()
        if form not in ("nce", "infonce"):
            raise ValueError(f"unknown PIRL loss form {form!r}; choose 'nce' or 'infonce'")
        if not 0.0 <= loss_weight <= 1.0:
            raise ValueError(f"loss_weight (lambda) must be in [0, 1], got {loss_weight}")
        self.form = form
        self.temperature = temperature
        self.loss_weight = loss_weight

    def term(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor,
        neg_mask: Optional[torch.Tensor],
        log_z: Optional[torch.Tensor],
        num_data: Optional[int],
    ) -> torch.Tensor:
        """One ``L(m_I, query)`` term in the configured form."""
        if self.form == "infonce":
            return pirl_infonce_loss(query, positive, negatives, self.temperature, neg_mask)
        if log_z is None or num_data is None:
            raise ValueError("the 'nce' form needs log_z (estimate it once with estimate_nce_log_z) and num_data (|D|)")
        return pirl_nce_loss(query, positive, negatives, log_z, num_data, self.temperature, neg_mask)

    def forward(
        self,
        jigsaw: torch.Tensor,
        image: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor,
        neg_mask: Optional[torch.Tensor] = None,
        log_z: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(total, jigsaw term, image term)`` for ``g(v_{I^t})``, ``f(v_I)`` and memory entries ``m_I``."""
        jig = self.term(jigsaw, positive, negatives, neg_mask, log_z, num_data)
        img = self.term(image, positive, negatives, neg_mask, log_z, num_data)
        return self.loss_weight * jig + (1.0 - self.loss_weight) * img, jig, img
