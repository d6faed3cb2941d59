"""MoCo's FIFO queue of momentum-encoder keys, identical on every rank and saved in checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslpipe.distributed import gather_no_grad
from sslpipe.memory.state import StepState


class MomentumQueue(StepState):
    """A ring buffer of the ``size`` most recent keys (the negatives of MoCo v1/v2).

    ``queue`` ``(size, dim)`` and ``ptr`` (next row to overwrite) are registered buffers, so they go
    into the checkpoint and a resumed run continues with the same contents and position. The pointer is also
    mirrored as a Python int, so writing the keys needs no device-to-host read of ``ptr`` (a GPU sync) per
    step; the mirror is refreshed when a state dict is loaded. The queue stays fp32 (:class:`StepState`). Under
    torch.distributed :meth:`enqueue` first gathers every rank's keys (rank order), so all ranks
    write the same rows and hold the same queue. ``size`` need not be a multiple of the global batch:
    a write that crosses the end is split and continues at row 0.

    Args:
        size: number of keys K (MoCo: 65536).
        dim: key width (MoCo: 128).
        seed: seed of the initial random unit vectors; a private generator makes them identical on
            every rank without communication and independent of the global RNG.
    """

    def __init__(self, size: int = 65536, dim: int = 128, seed: int = 0) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be >= 1, got size={size}, dim={dim}")
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("queue", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._ptr = 0  # host mirror of ptr
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync_pointer())

    fp32_buffers = ("queue",)

    def _sync_pointer(self) -> None:
        self._ptr = int(self.ptr)  # once per load, not per step

    @property
    def size(self) -> int:
        """Number of keys K the queue holds."""
        return self.queue.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, gather: bool = True) -> None:
        """Write ``keys`` ``(N, dim)`` (all ranks' keys when ``gather``) over the oldest rows.

        Writing more keys than the queue holds keeps the newest ``size`` of them, exactly as if
        they had been written one by one.
        """
        if keys.ndim != 2 or keys.shape[1] != self.queue.shape[1]:
            raise ValueError(f"keys must be (N, {self.queue.shape[1]}), got {tuple(keys.shape)}")
        keys = (gather_no_grad(keys) if gather else keys).detach().to(self.queue.dtype)
        n, size = keys.shape[0], self.size
        start = self._ptr
        if n >= size:  # only the newest `size` keys survive; they start where key n - size would go
            start = (start + n - size) % size
            keys = keys[n - size :]
        m = keys.shape[0]
        head = min(m, size - start)
        self.queue[start : start + head] = keys[:head]
        self.queue[: m - head] = keys[head:]  # the wrapped remainder (empty when nothing wraps)
        self._ptr = (start + m) % size
        self.ptr.fill_(self._ptr)

    def extra_repr(self) -> str:
        return f"size={self.queue.shape[0]}, dim={self.queue.shape[1]}"
