"""The one contrastive core under every contrastive loss: direct (materialised logits) or tiled (blocks).

Row ``i`` of the queries ``Q`` ``(N, d)`` is scored against the candidates ``K`` ``(M, d)`` with
``s_ij = cos(q_i, k_j)`` and logits ``s_ij / tau``. Each row has one positive, either

* a given vector ``p_i`` (``positives``: MoCo v2's key, PIRL's memory entry), or
* a column ``pos_col[i]`` of ``K`` (NT-Xent's other view, MoCo v3's own key),

and its negatives are the columns of ``K`` except ``pos_col[i]`` and ``exclude_col[i]`` (NT-Xent's own
view, PIRL's dropped memory slot). One excluded index per row is all the methods need, and it costs
O(N) where a boolean ``(N, M)`` mask would cost a matrix. Two reductions over the negatives:

* ``softmax`` (InfoNCE, NT-Xent): ``loss_i = -s_ip/tau + log(exp(s_ip/tau) + sum_j exp(s_ij/tau))``.
* ``nce`` (PIRL): ``loss_i = -logsigmoid(s_ip/tau - c_i) - sum_j logsigmoid(c_i - s_ij/tau)`` with the
  shift ``c_i = log Z + log(|D_N,i| / |D|)`` (``|D_N,i|``: row i's number of negatives).

Two forms give the same values and gradients (in fp32):

* direct (``block=None``): the ``(N, M)`` logit matrix under autograd. The reference; fastest for small N*M.
* tiled (``block=b``): ``b x b`` tiles of ``Q K^T``; the forward keeps a running per-row reduction
  (an online log-sum-exp for ``softmax``), the backward recomputes each tile and turns it into its
  gradient from the saved per-row result (softmax weights ``exp(s/tau - lse)``, or ``sigmoid``).
  Extra memory O((N + M) d + b^2) instead of O(N M).

``block="auto"`` (the default the methods expose as ``model.contrastive_block``) picks the direct form
while ``N * M <= AUTO_DIRECT_MAX_ENTRIES`` and tiles of ``AUTO_BLOCK`` beyond.

Everything is fp32 whatever the surrounding autocast: a cosine over a small tau exceeds bf16's resolution.
No host syncs: shapes are Python ints and the statistics stay tensors.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F

ContrastiveBlock = Optional[Union[int, Literal["auto"]]]
"""``None``: direct form; an int: tiled with that block size; ``"auto"``: chosen by size (:func:`resolve_block`)."""

Reduction = Literal["softmax", "nce"]

# Direct form up to 2^26 logits (256 MiB per fp32 (N, M) matrix; the direct form holds a few of them
# through the backward). Both constants are starting points, to be tuned with scripts/bench_loss.py on a GPU.
AUTO_DIRECT_MAX_ENTRIES = 1 << 26
AUTO_BLOCK = 4096

_NEG_INF = float("-inf")


def resolve_block(block: ContrastiveBlock, num_rows: int, num_cols: int) -> Optional[int]:
    """The block size to use for an ``(num_rows, num_cols)`` problem: ``None`` means the direct form.

    ``None`` and positive ints are returned as given; ``"auto"`` gives ``None`` while
    ``num_rows * num_cols <= AUTO_DIRECT_MAX_ENTRIES`` and ``AUTO_BLOCK`` beyond.
    """
    if block is None:
        return None
    if block == "auto":
        return None if num_rows * num_cols <= AUTO_DIRECT_MAX_ENTRIES else AUTO_BLOCK
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(
            f"contrastive block must be null (direct logits), 'auto' or a positive int (tile size), got {block!r}"
        )
    return block


def check_pair(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    """Two ``(N, d)`` tensors of equal shape (views, or queries and their keys); ``names`` like ``"z1 and z2"``."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{names} must be (N, d) of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _check(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: float,
    positives: Optional[torch.Tensor],
    pos_col: Optional[torch.Tensor],
    exclude_col: Optional[torch.Tensor],
    reduction: str,
    nce_log_z: Optional[Union[float, torch.Tensor]],
    nce_num_data: Optional[int],
) -> None:
    """The single place where the temperature and the shapes of every contrastive loss are checked."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; typical values are 0.05-1.0")
    if queries.ndim != 2 or keys.ndim != 2 or keys.shape[1] != queries.shape[1]:
        raise ValueError(
            f"need queries (N, d) and keys (M, d) of the same width d, got shapes {tuple(queries.shape)} "
            f"and {tuple(keys.shape)}"
        )
    if keys.shape[0] < 1:
        raise ValueError("keys must hold at least one row (M >= 1), got shape (0, d)")
    n = queries.shape[0]
    if (positives is None) == (pos_col is None):
        raise ValueError("give the positive of each row either as vectors (positives) or as key columns (pos_col)")
    if positives is not None and positives.shape != queries.shape:
        raise ValueError(
            f"positives must be (N, d) like the queries {tuple(queries.shape)}, got shape {tuple(positives.shape)}"
        )
    for name, col in (("pos_col", pos_col), ("exclude_col", exclude_col)):
        if col is not None and (col.shape != (n,) or col.dtype.is_floating_point or col.dtype == torch.bool):
            raise ValueError(
                f"{name} must be an integer tensor of shape (N,) = ({n},), got {col.dtype} {tuple(col.shape)}"
            )
    if reduction not in ("softmax", "nce"):
        raise ValueError(f"unknown contrastive reduction {reduction!r}; choose 'softmax' or 'nce'")
    if reduction == "nce" and (nce_log_z is None or nce_num_data is None or nce_num_data < 1):
        raise ValueError(
            f"the 'nce' reduction needs nce_log_z (see estimate_nce_log_z) and nce_num_data >= 1 (|D|), "
            f"got {nce_log_z!r} and {nce_num_data!r}"
        )


def _negatives_per_row(
    num_cols: int, pos_col: Optional[torch.Tensor], exclude_col: Optional[torch.Tensor], like: torch.Tensor
) -> torch.Tensor:
    """``(N,)`` fp32 count of each row's negatives: ``M`` minus its distinct excluded columns in ``[0, M)``."""
    count = torch.full((like.shape[0],), float(num_cols), device=like.device)
    if pos_col is not None:
        count = count - 1.0
    if exclude_col is not None:
        dropped = (exclude_col >= 0) & (exclude_col < num_cols)
        if pos_col is not None:
            dropped &= exclude_col != pos_col
        count = count - dropped.float()
    return count


def _excluded_columns(pos_col: Optional[torch.Tensor], exclude_col: Optional[torch.Tensor]) -> list[torch.Tensor]:
    return [col for col in (pos_col, exclude_col) if col is not None]


# ------------------------------------------------------------------------------------------------ direct form
def _direct(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    temperature: float,
    excluded: list[torch.Tensor],
    kind: Literal["softmax", "nce", "lse"],
    shift: Optional[torch.Tensor],
    with_stats: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-row result of ``kind`` on the materialised ``(N, M)`` logits, plus negative cos sum and max per row."""
    cos = q @ k.T
    logits = cos / temperature
    mask = None
    if excluded:
        cols = torch.arange(k.shape[0], device=q.device)
        for col in excluded:
            hit = cols[None, :] == col[:, None]
            mask = hit if mask is None else mask | hit
        logits = logits.masked_fill(mask, _NEG_INF)
    if kind == "softmax":  # the positive sits in column 0, so every row has one finite logit
        out = torch.logsumexp(torch.cat([pos[:, None], logits], dim=1), dim=1) - pos
    elif kind == "nce":
        out = F.softplus(shift - pos) + F.softplus(logits - shift[:, None]).sum(1)
    else:  # "lse": log-sum-exp over the negatives only
        out = torch.logsumexp(logits, dim=1)
    neg_sum = neg_max = None
    if with_stats:
        with torch.no_grad():
            cos = cos.detach()
            neg_sum = (cos if mask is None else cos.masked_fill(mask, 0.0)).sum(1)
            neg_max = (cos if mask is None else cos.masked_fill(mask, _NEG_INF)).amax(1)
    return out, neg_sum, neg_max


# ------------------------------------------------------------------------------------------------ tiled form
def _tile_cos(
    q_rows: torch.Tensor, k_cols: torch.Tensor, col_start: int, excluded_rows: list[torch.Tensor]
) -> torch.Tensor:
    """``cos`` of one tile with the excluded entries set to -inf, without a mask tensor: for every
    exclusion list, each row's entry is gathered, replaced by -inf if its column falls in this tile, and
    scattered back (a row whose column lies elsewhere writes back its own value)."""
    cos = q_rows @ k_cols.T
    width = cos.shape[1]
    for col in excluded_rows:
        local = col - col_start
        inside = ((local >= 0) & (local < width))[:, None]
        index = local.clamp(0, width - 1)[:, None]
        cos.scatter_(1, index, torch.where(inside, _NEG_INF, cos.gather(1, index)))
    return cos


class _TiledNegatives(torch.autograd.Function):
    """Per-row reduction over the negatives, tile by tile: ``lse`` (log-sum-exp of ``s/tau``) or
    ``softplus`` (``sum_j softplus(s_ij/tau - shift_i)``), with optional negative-cos sum and max per row.

    The forward keeps only per-row running values; the backward recomputes each tile of logits and
    weights it by the derivative of the reduction: ``exp(s/tau - lse_i)`` or ``sigmoid(s/tau - shift_i)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        shift: Optional[torch.Tensor],
        pos_col: Optional[torch.Tensor],
        exclude_col: Optional[torch.Tensor],
        temperature: float,
        block: int,
        kind: Literal["lse", "softplus"],
        with_stats: bool,
    ):
        n, m = q.shape[0], k.shape[0]
        excluded = _excluded_columns(pos_col, exclude_col)
        out = q.new_empty(n)
        neg_sum = q.new_zeros(n) if with_stats else None
        neg_max = q.new_full((n,), _NEG_INF) if with_stats else None
        for i0 in range(0, n, block):
            rows = slice(i0, min(i0 + block, n))
            excluded_rows = [col[rows] for col in excluded]
            acc = q.new_full((rows.stop - i0,), _NEG_INF) if kind == "lse" else q.new_zeros(rows.stop - i0)
            for j0 in range(0, m, block):
                cos = _tile_cos(q[rows], k[j0 : j0 + block], j0, excluded_rows)
                logits = cos / temperature
                if kind == "lse":  # merge this tile's log-sum-exp into the running one
                    acc = torch.logaddexp(acc, torch.logsumexp(logits, dim=1))
                else:
                    acc += F.softplus(logits - shift[rows, None]).sum(1)
                if with_stats:
                    neg_max[rows] = torch.maximum(neg_max[rows], cos.amax(1))
                    neg_sum[rows] += cos.masked_fill(cos == _NEG_INF, 0.0).sum(1)
            out[rows] = acc
        ctx.save_for_backward(q, k, shift, pos_col, exclude_col, out)
        ctx.temperature, ctx.block, ctx.kind = temperature, block, kind
        if with_stats:
            ctx.mark_non_differentiable(neg_sum, neg_max)
            return out, neg_sum, neg_max
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, *_stat_grads: torch.Tensor):  # type: ignore[override]
        q, k, shift, pos_col, exclude_col, out = ctx.saved_tensors
        need_q, need_k, need_shift = ctx.needs_input_grad[:3]
        temperature, block = ctx.temperature, ctx.block
        n, m = q.shape[0], k.shape[0]
        excluded = _excluded_columns(pos_col, exclude_col)
        grad_q = torch.zeros_like(q) if need_q else None
        grad_k = torch.zeros_like(k) if need_k else None
        grad_shift = torch.zeros_like(shift) if need_shift else None
        grad_out = grad_out.float()
        if ctx.kind == "lse":  # a row without negatives has lse = -inf and all-zero weights
            out = torch.where(torch.isfinite(out), out, torch.zeros_like(out))
        with torch.autocast(device_type=q.device.type, enabled=False):
            for i0 in range(0, n, block):
                rows = slice(i0, min(i0 + block, n))
                excluded_rows = [col[rows] for col in excluded]
                for j0 in range(0, m, block):
                    cols = slice(j0, min(j0 + block, m))
                    logits = _tile_cos(q[rows], k[cols], j0, excluded_rows) / temperature
                    if ctx.kind == "lse":
                        weight = torch.exp(logits - out[rows, None])  # softmax over the negatives
                    else:
                        weight = torch.sigmoid(logits - shift[rows, None])
                    weight = weight * grad_out[rows, None]
                    if need_shift:
                        grad_shift[rows] -= weight.sum(1)
                    weight = weight / temperature  # d out / d cos
                    if need_q:
                        grad_q[rows] += weight @ k[cols]
                    if need_k:
                        grad_k[cols] += weight.T @ q[rows]
        return grad_q, grad_k, grad_shift, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ public core
def _prepare(
    queries: torch.Tensor, keys: torch.Tensor, positives: Optional[torch.Tensor], pos_col: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit fp32 queries and keys, and each row's positive cosine ``(N,)``."""
    q = F.normalize(queries.float(), dim=1)
    k = F.normalize(keys.float(), dim=1)
    partner = F.normalize(positives.float(), dim=1) if positives is not None else k[pos_col]
    return q, k, (q * partner).sum(1)


def contrastive_row_losses(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: float,
    *,
    positives: Optional[torch.Tensor] = None,
    pos_col: Optional[torch.Tensor] = None,
    exclude_col: Optional[torch.Tensor] = None,
    reduction: Reduction = "softmax",
    nce_log_z: Optional[Union[float, torch.Tensor]] = None,
    nce_num_data: Optional[int] = None,
    block: ContrastiveBlock = None,
    return_stats: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Per-row contrastive losses ``(N,)`` of queries against candidate keys (see the module docstring).

    Args:
        queries: ``(N, d)``; L2-normalised here, in fp32.
        keys: ``(M, d)`` candidates (negatives, and the positives when ``pos_col`` is given); normalised
            here. Gradients flow into them when they require grad.
        temperature: tau (> 0).
        positives: ``(N, d)`` positive of each row (normalised here); or give ``pos_col``.
        pos_col: ``(N,)`` integer column of ``keys`` holding each row's positive (never a negative).
        exclude_col: ``(N,)`` integer column of ``keys`` that is no negative of that row; values outside
            ``[0, M)`` (e.g. -1) exclude nothing.
        reduction: ``softmax`` (InfoNCE) or ``nce`` (PIRL's noise-contrastive estimation).
        nce_log_z: ``log Z`` of the ``nce`` form (float or 0-dim tensor; gradients flow into a tensor).
        nce_num_data: ``|D|``, the number of slots the negatives are drawn from (``nce`` form).
        block: ``None`` direct form, an int tiled form with that tile size, ``"auto"`` by size.
        return_stats: also return 0-dim statistics of this call's rows (no gradients): ``energy_pos``
            (minus the mean positive cosine), ``energy_neg`` (minus the mean cosine over every row's
            negatives), ``energy_gap`` (``energy_neg - energy_pos``) and ``pretext_top1`` (fraction of
            rows whose positive scores strictly above all their negatives).

    Returns:
        ``(N,)`` fp32 losses, or ``(losses, stats)`` with ``return_stats``.
    """
    _check(queries, keys, temperature, positives, pos_col, exclude_col, reduction, nce_log_z, nce_num_data)
    n, m = queries.shape[0], keys.shape[0]
    block = resolve_block(block, n, m)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        q, k, pos_cos = _prepare(queries, keys, positives, pos_col)
        pos = pos_cos / temperature
        num_neg = _negatives_per_row(m, pos_col, exclude_col, q)
        shift = None
        if reduction == "nce":
            # log(|D_N,i| / |D|); a row without negatives (|D_N,i| = 0) has no negative term, so 1 avoids a -inf.
            log_noise = num_neg.clamp_min(1.0).log() - math.log(nce_num_data)
            shift = torch.as_tensor(nce_log_z, dtype=torch.float32, device=q.device) + log_noise
        if block is None:
            losses, neg_sum, neg_max = _direct(
                q, k, pos, temperature, _excluded_columns(pos_col, exclude_col), reduction, shift, return_stats
            )
        else:
            kind = "lse" if reduction == "softmax" else "softplus"
            result = _TiledNegatives.apply(q, k, shift, pos_col, exclude_col, temperature, block, kind, return_stats)
            reduced, neg_sum, neg_max = result if return_stats else (result, None, None)
            if reduction == "softmax":
                losses = torch.logaddexp(pos, reduced) - pos
            else:
                losses = F.softplus(shift - pos) + reduced
        if not return_stats:
            return losses
        with torch.no_grad():
            pos_cos = pos_cos.detach()
            mean_pos = pos_cos.mean()
            mean_neg = neg_sum.sum() / num_neg.sum().clamp_min(1.0)
            stats = {
                "energy_pos": -mean_pos,
                "energy_neg": -mean_neg,
                "energy_gap": mean_pos - mean_neg,
                "pretext_top1": (pos_cos > neg_max).float().mean(),
            }
        return losses, stats


def negative_logsumexp(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: float,
    *,
    exclude_col: Optional[torch.Tensor] = None,
    block: ContrastiveBlock = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` log-sum-exp of ``s_ij / tau`` over each row's negatives (every key but ``exclude_col``), and
    ``(N,)`` the number of those negatives; the same two forms as :func:`contrastive_row_losses`."""
    # queries stand in as positives only to pass the check; no positive enters this reduction.
    _check(queries, keys, temperature, queries, None, exclude_col, "softmax", None, None)
    n, m = queries.shape[0], keys.shape[0]
    block = resolve_block(block, n, m)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        q, k = F.normalize(queries.float(), dim=1), F.normalize(keys.float(), dim=1)
        count = _negatives_per_row(m, None, exclude_col, q)
        excluded = _excluded_columns(None, exclude_col)
        if block is None:
            lse, _, _ = _direct(q, k, q.new_zeros(n), temperature, excluded, "lse", None, False)
        else:
            lse = _TiledNegatives.apply(q, k, None, None, exclude_col, temperature, block, "lse", False)
        return lse, count
