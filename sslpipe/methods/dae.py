"""Denoising autoencoder (Vincent et al., 2008) on a ViT: reconstruct the clean image from a noisy one."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from sslpipe.losses.reconstruction import masked_mse_loss
from sslpipe.masking import patchify
from sslpipe.methods.masked import MaskedImageModel, Prediction


class DenoisingAutoencoder(MaskedImageModel):
    """Denoising autoencoder (Vincent et al., 2008) on a ViT: add Gaussian noise, predict every clean patch; MSE.

    Args:
        noise_std: standard deviation of the additive noise, in units of the normalised input.
        **kwargs: :class:`MaskedImageModel` and :class:`SSLMethod` arguments.
    """

    label = "dae"

    def __init__(self, noise_std: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if noise_std <= 0:
            raise ValueError(f"noise_std must be > 0, got {noise_std}")
        self.noise_std = noise_std
        self.head = nn.Linear(self.feature_dim, self.patch_dim)

    def predict(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> Prediction:
        """Encoder over the noisy image; linear head per patch token; every patch is scored (mask ``None``)."""
        noise = torch.randn(images.shape, device=images.device, generator=generator, dtype=images.dtype)
        noisy = images + self.noise_std * noise
        tokens = self.run_encoder(self.embed_patches(noisy))
        return Prediction(self.head(tokens[:, 1:]), patchify(noisy, self.patch_size), None, tokens)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """MSE against the clean image on the scored patches (every patch: :meth:`predict` gives no mask)."""
        return masked_mse_loss(pred, target, mask)
