"""A memory bank of one unit-norm embedding per training image (Wu et al., 2018; PIRL).

Each slot holds an exponential moving average of the embeddings its image received, so negatives
come from the whole data set at the cost of one forward pass per image per epoch. Under DDP every
rank applies every rank's updates, so the banks stay bit-identical without being broadcast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslpipe.distributed import gather_no_grad
from sslpipe.memory.state import StepState


class MemoryBank(StepState):
    """``(size, dim)`` fp32 buffer ``bank`` of unit vectors with EMA updates and negative sampling.

    Args:
        size: number of slots (the number of training images).
        dim: embedding width.
        momentum: EMA coefficient alpha in ``m <- alpha * m + (1 - alpha) * v`` (PIRL: 0.5).
        on_cpu: keep the bank in host memory even when the module moves to an accelerator
            (for ImageNet-scale banks that do not fit next to the model); rows travel on demand.
        seed: seed of the random unit-vector initialisation; the same on every rank, so ranks
            start identical without a broadcast.
    """

    bank: torch.Tensor
    fp32_buffers = ("bank",)

    def __init__(self, size: int, dim: int, momentum: float = 0.5, on_cpu: bool = False, seed: int = 0) -> None:
        super().__init__()
        if size < 2 or dim < 1:
            raise ValueError(f"a memory bank needs size >= 2 and dim >= 1, got size={size}, dim={dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.stays_on_cpu = on_cpu
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("bank", F.normalize(torch.randn(size, dim, generator=generator), dim=1))

    @property
    def size(self) -> int:
        """Number of slots."""
        return self.bank.shape[0]

    def get(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows ``indices`` (any device) as an fp32 tensor on ``indices``' device."""
        return self.bank[indices.to(self.bank.device)].to(indices.device)

    @torch.no_grad()
    def sample_negatives(self, indices: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` negatives per row, uniform without replacement over the bank minus the row's own slot.

        One shared set of ``num + 1`` distinct slots is drawn for the batch (one matrix product scores
        them all); each row then drops its own index if the set holds it, else the set's last slot.
        Either way a row keeps exactly ``num`` slots, a uniform draw from the other ``size - 1``.

        Returns:
            ``(slots, exclude)``: ``slots`` ``(num + 1,)`` on the bank's device, and ``exclude`` ``(B,)``
            long on ``indices``' device, the position in ``slots`` each row drops (the losses'
            ``exclude_col``).
        """
        if not 1 <= num <= self.size - 1:
            raise ValueError(f"num negatives must be in [1, {self.size - 1}] for a bank of {self.size}, got {num}")
        slots = torch.randperm(self.size, device=self.bank.device)[: num + 1]
        own = slots.to(indices.device)[None, :] == indices[:, None]  # (B, num+1), at most one True per row
        return slots, torch.where(own.any(1), own.int().argmax(1), num)

    @torch.no_grad()
    def update(self, indices: torch.Tensor, embeddings: torch.Tensor) -> None:
        """EMA-update slots ``indices`` with ``embeddings`` (unit vectors) from every rank, then renormalise.

        Indices repeated in the gathered batch (DistributedSampler pads the last batches by repeating
        samples) take the embedding of their first occurrence, so every write to a slot carries the same
        value and every rank ends with the same bank. Fixed shapes throughout (a stable sort finds first
        occurrences): no ``torch.unique``, whose data-dependent output size would stall the GPU every step.
        A bank kept on the CPU (``on_cpu``) costs one device-to-host copy of the batch's rows instead.
        """
        idx = gather_no_grad(indices.long().contiguous())
        emb = gather_no_grad(embeddings.detach().float().contiguous())
        n = idx.numel()
        sorted_idx, order = torch.sort(idx, stable=True)  # equal slots keep their batch order
        run_starts = torch.ones(n, dtype=torch.bool, device=idx.device)
        run_starts[1:] = sorted_idx[1:] != sorted_idx[:-1]
        positions = torch.arange(n, device=idx.device)
        run_start = torch.cummax(torch.where(run_starts, positions, 0), dim=0).values  # in sorted order
        first = torch.empty_like(order)
        first[order] = order[run_start]  # for each batch position: the position of its slot's first occurrence
        idx, emb = idx.to(self.bank.device), emb[first].to(self.bank.device)
        mixed = self.momentum * self.bank[idx] + (1.0 - self.momentum) * emb
        self.bank[idx] = F.normalize(mixed, dim=1)
