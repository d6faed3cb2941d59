"""Pixel reconstruction losses for masked image modelling (MAE, SimMIM) and denoising autoencoders.

Energy view: E(x, y) = ||decoder(encoder(x_visible)) - x_hidden||. Nothing pushes other images'
energy up explicitly; the information bottleneck (hidden patches, noise) is what keeps the energy
low only near the data. Only the hidden patches are scored: predicting the visible ones is copying.
"""

from __future__ import annotations

from typing import Optional

import torch


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise each patch by its own pixel mean and (unbiased) variance: MAE's ``norm_pix_loss`` target."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def _masked_mean(per_patch: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``(B, L)`` per-patch losses over the patches where ``mask`` is 1 (all patches if ``None``)."""
    if mask is None:
        return per_patch.mean()
    mask = mask.float()
    # clamp: a mask with no hidden patch gives 0, not NaN
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def _check(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target must be (B, L, D) of equal shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if mask is not None and mask.shape != pred.shape[:2]:
        raise ValueError(f"mask must be (B, L) = {tuple(pred.shape[:2])}, got {tuple(mask.shape)}")


def masked_mse_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    norm_pix: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mean squared error over the pixels of the hidden patches (MAE), always in fp32.

    Args:
        pred: ``(B, L, D)`` predicted patches.
        target: ``(B, L, D)`` true patches (see :func:`sslpipe.masking.patchify`).
        mask: ``(B, L)`` with 1 for patches that count; ``None`` scores every patch (denoising).
        norm_pix: compare against per-patch standardised pixels (MAE: better features).
        eps: variance floor of the per-patch standardisation.
    """
    _check(pred, target, mask)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        target = target.float()
        if norm_pix:
            target = normalize_patches(target, eps)
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        return _masked_mean(per_patch, mask)


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean absolute error over the pixels of the hidden patches (SimMIM), always in fp32."""
    _check(pred, target, mask)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        per_patch = (pred.float() - target.float()).abs().mean(dim=-1)
        return _masked_mean(per_patch, mask)
