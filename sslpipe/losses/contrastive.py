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
#: The methods' ``contrastive_block`` default: direct logits for small problems, tiles for large ones.
DEFAULT_BLOCK: ContrastiveBlock = "auto"
AUTO_DIRECT_MAX_ENTRIES = 1 << 26
AUTO_BLOCK = 4096

_NEG_INF = float("-inf")
_POS_INF = float("inf")


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


def _excluded_columns(
    pos_col: Optional[torch.Tensor], exclude_col: Optional[torch.Tensor], num_cols: int
) -> Optional[torch.Tensor]:
    """``(N, E)`` long: each row's distinct columns that are no negative (the positive's first), -1 for none."""
    excluded = [] if pos_col is None else [pos_col.long()]
    if exclude_col is not None:
        keep = (exclude_col >= 0) & (exclude_col < num_cols)
        if pos_col is not None:
            keep &= exclude_col != pos_col
        excluded.append(torch.where(keep, exclude_col.long(), -1))
    return torch.stack(excluded, dim=1) if excluded else None


def _negative_stats(
    q: torch.Tensor, k: torch.Tensor, excluded: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` number of negatives and sum of their cosines per row, in O((N + M) d): the cosines with
    every key are ``q_i . sum_j k_j``, minus those with the row's excluded keys."""
    count = torch.full((q.shape[0],), float(k.shape[0]), device=q.device)
    cos_sum = q @ k.sum(0)
    if excluded is not None:
        present = excluded >= 0
        count = count - present.sum(1)
        cos_excluded = (q[:, None, :] * k[excluded.clamp_min(0)]).sum(2)  # (N, E)
        cos_sum = cos_sum - cos_excluded.masked_fill(~present, 0.0).sum(1)
    return count, cos_sum


# ------------------------------------------------------------------------------------------------ direct form
def _direct(
    q: torch.Tensor,
    k: torch.Tensor,
    pos: torch.Tensor,
    excluded: Optional[torch.Tensor],
    pos_col: Optional[torch.Tensor],
    kind: Literal["softmax", "nce", "lse"],
    shift: Optional[torch.Tensor],
    with_max: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-row result of ``kind`` on the materialised ``(N, M)`` logits ``q @ k.T`` (``q`` already divided by
    tau), and with ``with_max`` the largest negative logit of each row."""
    logits = q @ k.T
    cols = torch.arange(k.shape[0], device=q.device)

    def mask_of(columns: torch.Tensor) -> torch.Tensor:  # (N, M) bool, True at each row's listed columns
        return (cols[None, :, None] == columns[:, None, :]).any(2)

    negatives_mask = None if excluded is None else mask_of(excluded)
    if kind == "softmax" and pos_col is not None:
        # The positive stays in its column, so the row's log-sum-exp already is the one over {positive} +
        # negatives: only the other excluded column is masked and no (N, M + 1) copy is made. The positive
        # logit is read from the same matrix, so a row without negatives gives exactly 0 (cross entropy).
        others = excluded[:, 1:]
        row = logits.masked_fill(mask_of(others), _NEG_INF) if others.shape[1] else logits
        out = torch.logsumexp(row, dim=1) - logits.gather(1, pos_col[:, None].long()).squeeze(1)
    else:
        neg = logits if negatives_mask is None else logits.masked_fill(negatives_mask, _NEG_INF)
        if kind == "softmax":  # the positive in column 0: every row has one finite logit
            out = torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos
        elif kind == "nce":
            out = F.softplus(shift - pos) + F.softplus(neg - shift[:, None]).sum(1)
        else:  # "lse": over the negatives only
            out = torch.logsumexp(neg, dim=1)
    neg_max = None
    if with_max:
        with torch.no_grad():
            neg = logits.detach()
            neg_max = (neg if negatives_mask is None else neg.masked_fill(negatives_mask, _NEG_INF)).amax(1)
    return out, neg_max


# ------------------------------------------------------------------------------------------------ tiled form
class _Located:
    """Where one row block's excluded columns fall: tile number and offset inside the tile (-1 tile: none)."""

    def __init__(self, excluded_rows: torch.Tensor, num_cols: int, block: int) -> None:
        self.tile = torch.where(excluded_rows >= 0, excluded_rows.div(block, rounding_mode="floor"), -1)
        self.offset = excluded_rows.remainder(block)
        # The last tile may be narrower: an offset meant for another tile must still be a valid index there.
        self.offset_last = self.offset.clamp_max((num_cols - 1) % block)

    def mask_(self, logits: torch.Tensor, tile: int, block: int) -> torch.Tensor:
        """Set this tile's excluded entries to -inf in place: one ``amin`` scatter of -inf (hit) or +inf (no-op)."""
        index = self.offset if logits.shape[1] == block else self.offset_last
        values = torch.where(self.tile == tile, _NEG_INF, _POS_INF)
        return logits.scatter_reduce_(1, index, values, reduce="amin")


def _tile_logits(
    q_rows: torch.Tensor, k: torch.Tensor, located: Optional[_Located], tile: int, block: int
) -> torch.Tensor:
    logits = q_rows @ k[tile * block : (tile + 1) * block].T
    return logits if located is None else located.mask_(logits, tile, block)


class _TiledNegatives(torch.autograd.Function):
    """Per-row reduction over the negatives, tile by tile: ``lse`` (log-sum-exp of the logits) or ``softplus``
    (``sum_j softplus(logit_ij - shift_i)``), and optionally the largest negative logit per row.

    ``q`` arrives divided by tau, so a tile of logits is one matrix product. The forward keeps only per-row
    running values; the backward recomputes each tile and weights it by the derivative of the reduction,
    ``exp(logit - lse_i)`` or ``sigmoid(logit - shift_i)``, times the row's incoming gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        shift: Optional[torch.Tensor],
        excluded: Optional[torch.Tensor],
        block: int,
        kind: Literal["lse", "softplus"],
        with_max: bool,
    ):
        n, m = q.shape[0], k.shape[0]
        num_tiles = -(-m // block)
        out = q.new_empty(n)
        neg_max = q.new_empty(n) if with_max else None
        for i0 in range(0, n, block):
            rows = slice(i0, min(i0 + block, n))
            located = None if excluded is None else _Located(excluded[rows], m, block)
            acc = q.new_full((rows.stop - i0,), _NEG_INF if kind == "lse" else 0.0)
            row_max = q.new_full((rows.stop - i0,), _NEG_INF) if with_max else None
            for tile in range(num_tiles):
                logits = _tile_logits(q[rows], k, located, tile, block)
                if kind == "lse":  # merge this tile's log-sum-exp into the running one
                    acc = torch.logaddexp(acc, torch.logsumexp(logits, dim=1))
                else:
                    acc += F.softplus(logits - shift[rows, None]).sum(1)
                if with_max:
                    row_max = torch.maximum(row_max, logits.amax(1))
            out[rows] = acc
            if with_max:
                neg_max[rows] = row_max
        ctx.save_for_backward(q, k, shift, excluded, out)
        ctx.block, ctx.kind = block, kind
        if with_max:
            ctx.mark_non_differentiable(neg_max)
            return out, neg_max
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, *_max_grad: torch.Tensor):  # type: ignore[override]
        q, k, shift, excluded, out = ctx.saved_tensors
        need_q, need_k, need_shift = ctx.needs_input_grad[:3]
        block, n, m = ctx.block, q.shape[0], k.shape[0]
        grad_q = torch.zeros_like(q) if need_q else None
        grad_k = torch.zeros_like(k) if need_k else None
        grad_shift = torch.zeros_like(shift) if need_shift else None
        grad_out = grad_out.float()
        if ctx.kind == "lse":  # a row without negatives has lse = -inf and all-zero weights
            out = torch.where(torch.isfinite(out), out, torch.zeros_like(out))
        with torch.autocast(device_type=q.device.type, enabled=False):
            for i0 in range(0, n, block):
                rows = slice(i0, min(i0 + block, n))
                located = None if excluded is None else _Located(excluded[rows], m, block)
                for tile in range(-(-m // block)):
                    cols = slice(tile * block, min((tile + 1) * block, m))
                    logits = _tile_logits(q[rows], k, located, tile, block)
                    if ctx.kind == "lse":
                        weight = torch.exp(logits - out[rows, None])  # softmax over the negatives
                    else:
                        weight = torch.sigmoid(logits - shift[rows, None])
                    weight = weight * grad_out[rows, None]  # d loss / d logit
                    if need_shift:
                        grad_shift[rows] -= weight.sum(1)
                    if need_q:
                        grad_q[rows].addmm_(weight, k[cols])
                    if need_k:
                        grad_k[cols].addmm_(weight.T, q[rows])
        return grad_q, grad_k, grad_shift, None, None, None, None


# ------------------------------------------------------------------------------------------------ public core
def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=1)


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
        q, k = _unit(queries), _unit(keys)
        scaled = q / temperature  # logits are scaled @ k.T: no (N, M) division
        pos = (scaled * (_unit(positives) if positives is not None else k[pos_col])).sum(1)
        excluded = _excluded_columns(pos_col, exclude_col, m)
        num_neg, neg_cos_sum = None, None
        if reduction == "nce" or return_stats:
            with torch.no_grad():
                num_neg, neg_cos_sum = _negative_stats(q.detach(), k.detach(), excluded)
        shift = None
        if reduction == "nce":
            # log(|D_N,i| / |D|); a row without negatives (|D_N,i| = 0) has no negative term, so 1 avoids a -inf.
            log_noise = num_neg.clamp_min(1.0).log() - math.log(nce_num_data)
            shift = torch.as_tensor(nce_log_z, dtype=torch.float32, device=q.device) + log_noise
        if block is None:
            losses, neg_max = _direct(scaled, k, pos, excluded, pos_col, reduction, shift, return_stats)
        else:
            kind = "lse" if reduction == "softmax" else "softplus"
            result = _TiledNegatives.apply(scaled, k, shift, excluded, block, kind, return_stats)
            reduced, neg_max = result if return_stats else (result, None)
            if reduction == "softmax":
                losses = torch.logaddexp(pos, reduced) - pos
            else:
                losses = F.softplus(shift - pos) + reduced
        if not return_stats:
            return losses
        with torch.no_grad():
            pos = pos.detach()
            mean_pos = pos.mean() * temperature
            mean_neg = neg_cos_sum.sum() / num_neg.sum().clamp_min(1.0)
            stats = {
                "energy_pos": -mean_pos,
                "energy_neg": -mean_neg,
                "energy_gap": mean_pos - mean_neg,
                "pretext_top1": (pos > neg_max).float().mean(),
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
    # The queries stand in as positives only to pass the check; no positive enters this reduction.
    _check(queries, keys, temperature, queries, None, exclude_col, "softmax", None, None)
    n, m = queries.shape[0], keys.shape[0]
    block = resolve_block(block, n, m)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        scaled, k = _unit(queries) / temperature, _unit(keys)
        excluded = _excluded_columns(None, exclude_col, m)
        count = torch.full((n,), float(m), device=scaled.device)
        if excluded is not None:
            count = count - (excluded >= 0).sum(1)
        if block is None:
            lse, _ = _direct(scaled, k, scaled.new_zeros(n), excluded, None, "lse", None, False)
        else:
            lse = _TiledNegatives.apply(scaled, k, None, excluded, block, "lse", False)
        return lse, count
