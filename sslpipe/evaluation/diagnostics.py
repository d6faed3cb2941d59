"""Energy diagnostics of an embedding: positive vs negative energy, alignment, uniformity, effective rank.

Energy is the negative cosine similarity of normalised embeddings, so a good contrastive model has
low positive energy, high negative energy, and a large gap between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def contrastive_energies(z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean energy ``-cos`` of positive pairs ``(z1[i], z2[i])`` and of negatives ``(z1[i], z2[j]), i != j``."""
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    sim = a @ b.T
    n = sim.shape[0]
    pos = sim.diagonal().mean()
    neg = (sim.sum() - sim.diagonal().sum()) / max(1, n * (n - 1))
    return {"energy_pos": -pos, "energy_neg": -neg, "energy_gap": pos - neg}


@torch.no_grad()
def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Wang & Isola's alignment: ``E ||f(x) - f(x+)||^alpha`` over positive pairs (lower is better)."""
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    return (a - b).norm(dim=1).pow(alpha).mean()


@torch.no_grad()
def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola's uniformity: ``log E exp(-t ||f(x) - f(y)||^2)`` over distinct pairs (lower is better)."""
    z = F.normalize(z.float(), dim=1)
    return torch.pdist(z).pow(2).mul(-t).exp().mean().log()


@torch.no_grad()
def effective_rank(features: torch.Tensor) -> torch.Tensor:
    """RankMe (Garrido et al., 2023): ``exp`` of the entropy of the normalised singular values.

    Equals the feature width for perfectly spread features and 1 for collapsed ones.
    """
    s = torch.linalg.svdvals(features.float() - features.float().mean(0))
    p = s / s.sum().clamp_min(1e-12) + 1e-12
    return torch.exp(-(p * p.log()).sum())
