"""Projection and prediction MLPs shared by the methods."""

from __future__ import annotations

from torch import nn


def mlp(
    in_dim: int,
    hidden_dim: int = 2048,
    out_dim: int = 128,
    num_layers: int = 2,
    batch_norm: bool = True,
    last_batch_norm: bool = False,
) -> nn.Sequential:
    """Linear-(BN)-ReLU blocks then a final Linear: SimCLR/MoCo projection heads, MoCo v3/BYOL predictors.

    Args:
        in_dim: input width (the backbone's feature width).
        hidden_dim: width of the hidden layers.
        out_dim: output width.
        num_layers: number of Linear layers (>= 1; 1 is a linear projection).
        batch_norm: BatchNorm after each hidden Linear.
        last_batch_norm: affine-free BatchNorm on the output (MoCo v3's projector).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_batch_norm))
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
