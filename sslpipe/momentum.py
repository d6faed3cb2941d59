"""Momentum (EMA) target networks: MoCo's key encoder, and the teacher of BYOL/DINO-style methods.

The target is a frozen copy of online modules that the optimiser never sees (``requires_grad=False``
keeps it out of :meth:`SSLMethod.configure_optimizers`); after each optimiser step its weights move
towards the online weights, ``theta_t <- m * theta_t + (1 - m) * theta_o``.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every parameter frozen (``requires_grad=False``), ready for EMA updates."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, m: float) -> None:
    """In place: ``target_param <- m * target_param + (1 - m) * online_param``; buffers are copied.

    Buffers (BatchNorm running statistics, counters) are copied rather than averaged: they are not
    learned, and a copy keeps integer buffers exact. Both modules must have the same architecture.

    Args:
        target: the momentum network (updated in place).
        online: the network trained by the optimiser.
        m: momentum in ``[0, 1]``; 1 freezes the target, 0 copies the online network.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must lie in [0, 1], got {m}")
    t_params, o_params = list(target.parameters()), list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError(
            f"target has {len(t_params)} parameters but online has {len(o_params)}: build it with momentum_copy(online)"
        )
    if t_params:
        # One fused kernel for all tensors instead of a Python loop of small ops.
        torch._foreach_lerp_(t_params, [o.detach() for o in o_params], 1.0 - m)
    for t_buf, o_buf in zip(target.buffers(), online.buffers()):
        t_buf.copy_(o_buf)


def cosine_momentum(step: int, total: int, m0: float) -> float:
    """MoCo v3 / BYOL schedule: ``m`` rises from ``m0`` at step 0 to 1 at ``total`` along a half cosine.

    ``m(step) = 1 - (1 - m0) * (1 + cos(pi * step / total)) / 2``; steps past ``total`` give 1.
    """
    if total <= 0:
        raise ValueError(f"total steps must be > 0, got {total}")
    progress = min(max(step / total, 0.0), 1.0)
    return 1.0 - (1.0 - m0) * (1.0 + math.cos(math.pi * progress)) / 2.0


class MomentumEncoder(nn.Sequential):
    """The EMA copy of online modules applied in sequence (MoCo: backbone then projector), with its schedule.

    ``MomentumEncoder({"backbone": net, "projector": head})`` holds frozen copies under the same names
    (checkpoint keys ``<attr>.backbone.*``, ``<attr>.projector.*``) and keeps references to the online
    modules, so :meth:`update` needs no arguments beyond the schedule's position.
    :class:`~sslpipe.methods.SSLMethod` calls :meth:`update` on every momentum encoder it holds right
    after each optimiser step, so a method only builds one and reads keys from it.

    Args:
        online: the modules to copy, in the order the forward pass applies them.
        momentum: ``m`` (MoCo v2: 0.999), or its start ``m0`` with ``cosine`` (MoCo v3: 0.99).
        cosine: raise ``m`` from ``momentum`` to 1 over training along a half cosine (MoCo v3, BYOL).
    """

    num_updates: torch.Tensor

    def __init__(self, online: dict[str, nn.Module], momentum: float = 0.999, cosine: bool = False) -> None:
        super().__init__(OrderedDict((name, momentum_copy(module)) for name, module in online.items()))
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        # Plain references, not submodules: the method owns and trains them; a list attribute is not registered.
        self._online = list(online.values())
        self.momentum = momentum
        self.cosine = cosine
        # Optimiser steps folded in so far: a checkpointed record (the schedule follows trainer.global_step).
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def momentum_at(self, step: int, total_steps: float) -> float:
        """``m`` for the update after optimiser step ``step`` of ``total_steps`` (constant unless ``cosine``)."""
        if not self.cosine or not math.isfinite(total_steps):
            return self.momentum
        return cosine_momentum(step, max(1, int(total_steps)), self.momentum)

    @torch.no_grad()
    def update(self, step: int, total_steps: float) -> float:
        """Move every copy towards its online module with ``momentum_at(step, total_steps)``; return that ``m``."""
        m = self.momentum_at(step, total_steps)
        for target, online in zip(self, self._online):
            ema_update_(target, online, m)
        self.num_updates += 1
        return m

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The target network's output for ``x`` (never differentiated)."""
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, cosine={self.cosine}"
