"""Momentum (EMA) target networks shared by MoCo, BYOL, DINO-style methods.

The target is a frozen copy of an online module that the optimiser never sees
(``requires_grad=False`` keeps it out of :meth:`SSLMethod.configure_optimizers`); after each optimiser
step its weights move towards the online weights, ``theta_t <- m * theta_t + (1 - m) * theta_o``.
"""

from __future__ import annotations

import copy
import math

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
