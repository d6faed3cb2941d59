"""MAE (He et al., 2022): encode only the visible patches, decode every patch, MSE on the hidden ones."""

from __future__ import annotations

from typing import Any, Optional

import torch

from sslpipe.errors import check_open_unit
from sslpipe.heads import MAEDecoder
from sslpipe.losses.reconstruction import masked_mse_loss
from sslpipe.masking import gather_tokens, patchify, random_masking
from sslpipe.methods.base import check_method_sizes
from sslpipe.methods.masked import MaskedImageModel, Prediction


class MaskedAutoencoder(MaskedImageModel):
    """MAE: encode the visible patches only, decode all patches with a light Transformer, MSE on the hidden ones.

    Args:
        mask_ratio: share of patches hidden per image (MAE: 0.75).
        norm_pix_loss: regress per-patch standardised pixels (MAE: better features on ImageNet).
        decoder_dim: decoder width (MAE: 512).
        decoder_depth: decoder blocks (MAE: 8).
        decoder_heads: decoder attention heads (MAE: 16).
        decoder_mlp_ratio: decoder MLP width over ``decoder_dim``.
        **kwargs: :class:`MaskedImageModel` and :class:`SSLMethod` arguments.
    """

    label = "mae"

    def __init__(
        self,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        **kwargs: Any,
    ) -> None:
        check_open_unit("model.mask_ratio", mask_ratio)
        check_method_sizes(decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=decoder_heads)
        super().__init__(**kwargs)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.decoder = MAEDecoder(
            self.num_patches,
            self.feature_dim,
            self.patch_dim,
            decoder_dim,
            decoder_depth,
            decoder_heads,
            decoder_mlp_ratio,
        )

    def predict(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> Prediction:
        """Encoder on the visible tokens, decoder over all positions."""
        mask = random_masking(images.shape[0], self.num_patches, self.mask_ratio, self.device, generator)
        tokens = self.run_encoder(gather_tokens(self.embed_patches(images), mask.ids_keep))
        corrupted = patchify(images, self.patch_size) * (1 - mask.mask.unsqueeze(-1))
        return Prediction(self.decoder(tokens, mask.ids_restore), corrupted, mask.mask, tokens)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """MSE on the hidden patches (optionally against standardised patches)."""
        return masked_mse_loss(pred, target, mask, norm_pix=self.norm_pix_loss)

    def to_pixels(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Undo ``norm_pix_loss`` with the true patch's statistics (display only, as in MAE's demo)."""
        if not self.norm_pix_loss:
            return pred
        return pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
