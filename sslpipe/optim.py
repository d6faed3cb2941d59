"""Optimisers and schedules shared by every method: SGD, AdamW, LARS; linear warm-up then cosine."""

from __future__ import annotations

import math
from typing import Iterable, Literal

import torch
from torch import nn

OptimizerName = Literal["sgd", "adamw", "lars"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as used by SimCLR.

    Each parameter's decayed gradient ``d = g + wd * w`` is scaled by ``trust = eta * ||w|| / ||d||``
    (SimCLR's form; the LARS paper divides by ``||g|| + wd * ||w||``, an upper bound of ``||d||``). Groups with
    ``lars_exclude=True`` (biases, norm weights, the online probe) get plain SGD: adapting them by
    their own tiny norms is known to destabilise training.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0:
            raise ValueError(f"LARS lr must be >= 0, got {lr}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One LARS step; ``closure`` re-evaluates the loss as in ``torch.optim.SGD``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["eta"] * w_norm / (g_norm + group["eps"]),
                        torch.ones_like(w_norm),
                    )
                    g = g.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm-layer weights, tokens and position embeddings (all 1-D or named so) get no weight decay."""
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or any(key in name for key in ("pos_embed", "cls_token", "mask_token", "dist_token"))
    )


def param_groups(
    module: nn.Module, weight_decay: float, exclude_bias_norm: bool = True, prefix_excluded: tuple[str, ...] = ()
) -> list[dict]:
    """Split ``module``'s trainable parameters into a decayed group and a no-decay/no-LARS group.

    Parameters whose names start with one of ``prefix_excluded`` are skipped (they get their own group).
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad or name.startswith(prefix_excluded):
            continue
        (no_decay if exclude_bias_norm and is_no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def build_optimizer(
    name: OptimizerName, groups: list[dict], lr: float, momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.Optimizer:
    """Instantiate the named optimiser over ``groups`` (which carry their own weight decay)."""
    if name == "sgd":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}: choose 'sgd', 'adamw' or 'lars'")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_ratio: float = 0.0) -> float:
    """LR multiplier: linear from ~0 to 1 over ``warmup_steps``, then cosine down to ``final_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
