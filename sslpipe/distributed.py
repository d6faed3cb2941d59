"""Rank-consistent helpers for torch.distributed that also work without it (one process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 outside torch.distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 outside torch.distributed)."""
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice.

    A plain ``all_gather`` returns tensors detached from the other ranks' graphs, so the
    loss terms that use another rank's embeddings would never send gradient back to it.
    Here the backward all-reduces (sums) the incoming gradient over ranks and returns
    this rank's slice: rank r then holds d(sum_s L_s)/dz_r, and DDP's gradient averaging
    turns that into the gradient of the global-batch mean loss.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.batch = tensor.shape[0]
        return gather_no_grad(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # A copy: autograd may hand this same gradient tensor to other consumers, and all_reduce
        # works in place.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) from all ranks along dim 0, keeping gradients.

    Rank r's rows sit at ``[r*B, (r+1)*B)``. Without torch.distributed it returns ``tensor``.
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 without gradients (queues, memory banks)."""
    if not is_distributed():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src`` so every rank holds the same values; no-op on one process."""
    if is_distributed():
        dist.broadcast(tensor, src)
    return tensor


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the global batch across ranks (MoCo's shuffle-BN); returns this rank's share and the undo index.

    Every rank gathers the global batch, applies one permutation drawn on rank 0 and keeps its own
    ``N`` rows of the permuted batch, so BatchNorm statistics of the keys come from a random subset
    of images rather than the subset whose queries this rank holds. Pass the returned index to
    :func:`batch_unshuffle`. On one process the batch is only permuted (a no-op for BatchNorm over
    the whole batch; see :mod:`sslpipe.batchnorm`'s split-BN for the single-device equivalent).
    """
    x_all = gather_no_grad(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    broadcast_(perm)  # one permutation for all ranks, or rows would be lost or duplicated
    n = x.shape[0]
    return x_all[perm[rank() * n : (rank() + 1) * n]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo :func:`batch_shuffle` on its outputs: row i of the result belongs to this rank's input row i."""
    x_all = gather_no_grad(x)
    n = x.shape[0]
    return x_all[unshuffle[rank() * n : (rank() + 1) * n]]
