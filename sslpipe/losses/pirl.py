"""PIRL's losses against memory-bank negatives: noise-contrastive estimation (the paper's) and InfoNCE.

With ``s`` the cosine similarity and ``tau`` the temperature, PIRL scores a (query, memory) pair by
the NCE posterior that it is a data pair rather than one of ``|D_N|`` noise samples drawn uniformly
from the ``|D|`` slots::

    h(u, v) = (exp(s/tau) / Z) / (exp(s/tau) / Z + |D_N| / |D|) = sigmoid(s/tau - log Z - log(|D_N| / |D|))

so ``-log h`` and ``-log(1 - h)`` are log-sigmoids: stable for any ``s/tau``. ``Z`` (the partition
function estimate of Wu et al., 2018) is fixed after the first batch; the caller owns it, which
keeps these functions pure. The InfoNCE form replaces ``h`` by a softmax over the positive and
the negatives. Both are the ``nce`` and ``softmax`` reductions of :mod:`sslpipe.losses.contrastive`.

The batch shares one set of negatives (one matrix product scores them all); row b does not use the
column ``exclude_col[b]`` (its own slot, see :meth:`sslpipe.memory.MemoryBank.sample_negatives`), so
``|D_N|`` is the number of negatives minus one for a row that drops a column.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
from torch import nn

from sslpipe.losses.contrastive import ContrastiveBlock, contrastive_row_losses, negative_logsumexp

PIRLLossForm = Literal["nce", "infonce"]
LossAndStats = Union[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]


def estimate_nce_log_z(
    query: torch.Tensor,
    negatives: torch.Tensor,
    num_data: int,
    temperature: float = 0.07,
    exclude_col: Optional[torch.Tensor] = None,
    block: ContrastiveBlock = None,
) -> torch.Tensor:
    """``log Z`` with ``Z = |D| * mean exp(s/tau)`` over every row's negatives of one batch (a 0-dim tensor).

    Args:
        query: ``(B, d)`` embeddings.
        negatives: ``(K, d)`` memory-bank entries shared by the batch.
        num_data: ``|D|``, the number of slots the negatives were drawn from.
        temperature: ``tau``.
        exclude_col: ``(B,)`` column of ``negatives`` that row b does not use (-1: none); ``None``: none.
        block: direct (``None``), tiled (an int) or ``"auto"``; see :mod:`sslpipe.losses.contrastive`.
    """
    lse, count = negative_logsumexp(query, negatives, temperature, exclude_col=exclude_col, block=block)
    return torch.logsumexp(lse, 0) - count.sum().clamp_min(1.0).log() + math.log(num_data)


def pirl_nce_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    log_z: Union[float, torch.Tensor],
    num_data: int,
    temperature: float = 0.07,
    exclude_col: Optional[torch.Tensor] = None,
    block: ContrastiveBlock = None,
    return_stats: bool = False,
) -> LossAndStats:
    """PIRL's NCE loss ``-log h(m_I, q) - sum_{I' in D_N} log(1 - h(q, m_I'))``, averaged over the batch.

    Args:
        query: ``(B, d)`` embeddings (``g(v_{I^t})`` or ``f(v_I)``).
        positive: ``(B, d)`` memory-bank entries ``m_I`` of the same images.
        negatives: ``(K, d)`` memory-bank entries shared by the batch.
        log_z: log of the NCE normaliser ``Z`` (see :func:`estimate_nce_log_z`).
        num_data: ``|D|``, the number of slots the negatives were drawn from.
        temperature: ``tau``.
        exclude_col: ``(B,)`` column of ``negatives`` outside row b's ``D_N`` (-1: none); ``None``: every
            negative for every row.
        block: direct (``None``), tiled (an int) or ``"auto"``; see :mod:`sslpipe.losses.contrastive`.
        return_stats: also return the energies and pretext top-1 of the batch.
    """
    out = contrastive_row_losses(
        query,
        negatives,
        temperature,
        positives=positive,
        exclude_col=exclude_col,
        reduction="nce",
        nce_log_z=log_z,
        nce_num_data=num_data,
        block=block,
        return_stats=return_stats,
    )
    return (out[0].mean(), out[1]) if return_stats else out.mean()


def pirl_infonce_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.07,
    exclude_col: Optional[torch.Tensor] = None,
    block: ContrastiveBlock = None,
    return_stats: bool = False,
) -> LossAndStats:
    """``-log [exp(s(m_I,q)/tau) / (exp(s(m_I,q)/tau) + sum_{I' in D_N} exp(s(q,m_I')/tau))]``, batch mean.

    Arguments as in :func:`pirl_nce_loss`.
    """
    out = contrastive_row_losses(
        query,
        negatives,
        temperature,
        positives=positive,
        exclude_col=exclude_col,
        block=block,
        return_stats=return_stats,
    )
    return (out[0].mean(), out[1]) if return_stats else out.mean()


class PIRLLoss(nn.Module):
    """``lambda * L(m_I, g(v_{I^t})) + (1 - lambda) * L(m_I, f(v_I))`` with ``L`` the NCE or InfoNCE form.

    Args:
        form: ``nce`` (PIRL's) or ``infonce``.
        temperature: ``tau`` (PIRL: 0.07).
        loss_weight: ``lambda``, the jigsaw term's weight (PIRL: 0.5).
        block: direct (``None``), tiled (an int) or ``"auto"``; see :mod:`sslpipe.losses.contrastive`.
    """

    def __init__(
        self,
        form: PIRLLossForm = "nce",
        temperature: float = 0.07,
        loss_weight: float = 0.5,
        block: ContrastiveBlock = None,
    ) -> None:
        super().__init__()
        if form not in ("nce", "infonce"):
            raise ValueError(f"unknown PIRL loss form {form!r}; choose 'nce' or 'infonce'")
        if not 0.0 <= loss_weight <= 1.0:
            raise ValueError(f"loss_weight (lambda) must be in [0, 1], got {loss_weight}")
        self.form = form
        self.temperature = temperature
        self.loss_weight = loss_weight
        self.block = block

    def term(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor,
        exclude_col: Optional[torch.Tensor],
        log_z: Optional[torch.Tensor],
        num_data: Optional[int],
        return_stats: bool = False,
    ) -> LossAndStats:
        """One ``L(m_I, query)`` term in the configured form."""
        if self.form == "infonce":
            return pirl_infonce_loss(
                query, positive, negatives, self.temperature, exclude_col, self.block, return_stats
            )
        if log_z is None or num_data is None:
            raise ValueError("the 'nce' form needs log_z (estimate it once with estimate_nce_log_z) and num_data (|D|)")
        return pirl_nce_loss(
            query, positive, negatives, log_z, num_data, self.temperature, exclude_col, self.block, return_stats
        )

    def forward(
        self,
        jigsaw: torch.Tensor,
        image: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor,
        exclude_col: Optional[torch.Tensor] = None,
        log_z: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
        return_stats: bool = False,
    ) -> Union[tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        """``(total, jigsaw term, image term)`` for ``g(v_{I^t})``, ``f(v_I)`` and memory entries ``m_I``.

        With ``return_stats`` a fourth item: the statistics of the jigsaw term (the transformation-invariance
        task PIRL is about).
        """
        jig = self.term(jigsaw, positive, negatives, exclude_col, log_z, num_data, return_stats)
        img = self.term(image, positive, negatives, exclude_col, log_z, num_data)
        if return_stats:
            jig, stats = jig
            return self.loss_weight * jig + (1.0 - self.loss_weight) * img, jig, img, stats
        return self.loss_weight * jig + (1.0 - self.loss_weight) * img, jig, img
