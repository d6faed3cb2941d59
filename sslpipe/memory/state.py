"""The base of state that lives across training steps (queues, memory banks): fp32 buffers that never get cast."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn


class StepState(nn.Module):
    """A module whose ``fp32_buffers`` follow device moves but not dtype casts (and optionally stay on the CPU).

    Under ``bf16-true``/``16-true`` precision Lightning casts the model's buffers; stored embeddings compared at
    a temperature of 0.07-0.2 need fp32 (bf16 keeps ~3 significant digits), and EMA steps between unit vectors
    need the precision too. ``.to(device)`` and ``.half()`` reach buffers through ``_apply``, so the protected
    buffers are taken out first: a CPU-pinned buffer then never makes a transient copy on the accelerator.

    Attributes:
        fp32_buffers: names of the protected buffers.
        stays_on_cpu: keep them in host memory when the module moves to an accelerator.
    """

    fp32_buffers: ClassVar[tuple[str, ...]] = ()
    stays_on_cpu: bool = False

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        kept = {name: self._buffers.pop(name) for name in self.fp32_buffers}
        try:
            out = super()._apply(fn, recurse)
        finally:
            for name, buffer in kept.items():
                if not self.stays_on_cpu:
                    moved = fn(buffer)
                    buffer = moved if moved.dtype == torch.float32 else buffer.to(moved.device)
                self._buffers[name] = buffer
        return out
