"""Energy diagnostics of an embedding: positive vs negative energy, alignment, uniformity, effective rank.

Energy is the negative cosine similarity of normalised embeddings, so a good contrastive model has
low positive energy, high negative energy, and a large gap between them. Every function here is pure
(tensors in, tensors out) and normalises its inputs itself; :func:`representation_metrics` gathers them
for the :class:`~sslpipe.callbacks.RepresentationDiagnostics` callback and ``sslpipe report``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def pair_energies(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every energy ``-cos``: positives ``(z1[i], z2[i])`` as ``(N,)`` and negatives ``(z1[i], z2[j]), i != j``
    as ``(N * (N - 1),)`` (row-major, the diagonal left out). The distributions behind :func:`contrastive_energies`."""
    a, b = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    energy = -(a @ b.T)
    off_diagonal = ~torch.eye(energy.shape[0], dtype=torch.bool, device=energy.device)
    return energy.diagonal().clone(), energy[off_diagonal]


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
    """Wang & Isola's uniformity: ``log E exp(-t ||f(x) - f(y)||^2)`` over distinct pairs (lower is better).

    0 for a collapsed embedding (every distance 0); ``-4 t`` would need every pair antipodal. ``logsumexp``
    keeps it finite where the mean of the exponentials underflows.
    """
    z = F.normalize(z.float(), dim=1)
    d2 = torch.pdist(z).pow(2)  # the N (N - 1) / 2 distinct pairs, the diagonal left out
    return torch.logsumexp(-t * d2, dim=0) - torch.log(torch.tensor(float(d2.numel())))


@torch.no_grad()
def effective_rank(features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe (Garrido et al., 2023): ``exp`` of the entropy of ``p = s / ||s||_1 + eps``, ``s`` the singular
    values of the (uncentred, as in the paper) embedding matrix ``(N, D)``.

    Between 1 (every row on one line: a collapsed embedding) and ``min(N, D)`` (a flat spectrum).
    """
    s = torch.linalg.svdvals(features.float())
    p = s / s.sum().clamp_min(1e-12) + eps
    return torch.exp(-(p * p.log()).sum())


@torch.no_grad()
def dimension_std(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and minimum over dimensions of the per-dimension std of the L2-normalised embedding.

    A collapsed embedding has std 0 in every dimension; one spread evenly over the sphere of ``D`` dimensions
    has ``1 / sqrt(D)`` in each (SimSiam's collapse check). Population std (divides by ``N``).
    """
    std = F.normalize(z.float(), dim=1).std(dim=0, correction=0)
    return std.mean(), std.min()


@torch.no_grad()
def representation_metrics(
    z: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0, t: float = 2.0
) -> dict[str, torch.Tensor]:
    """The diagnostics of one embedding: ``rankme``, ``uniformity`` and the std of the L2-normalised features ``z``
    (one image each), plus ``alignment`` and the energies of the positive pairs ``(z1[i], z2[i])``.

    Rank and std are computed on the L2-normalised ``z``: the embedding the energies and probes compare.
    """
    mean_std, min_std = dimension_std(z)
    return {
        "rankme": effective_rank(F.normalize(z.float(), dim=1)),
        "uniformity": uniformity(z, t),
        "alignment": alignment(z1, z2, alpha),
        "std_mean": mean_std,
        "std_min": min_std,
        **contrastive_energies(z1, z2),
    }
