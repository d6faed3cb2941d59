"""SimMIM (Xie et al., 2022): mask tokens inside the encoder, a linear pixel head, L1 on the hidden patches."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from sslpipe.errors import check_open_unit
from sslpipe.losses.reconstruction import masked_l1_loss
from sslpipe.masking import block_masking, patchify
from sslpipe.methods.base import check_method_sizes
from sslpipe.methods.masked import MaskedImageModel, Prediction


class SimMIM(MaskedImageModel):
    """SimMIM: a learned mask token replaces hidden patches inside the encoder; linear pixel head; L1 on hidden patches.

    Args:
        mask_ratio: share of patches hidden per image (SimMIM: 0.6).
        mask_block_size: hide square blocks of this many patches per side (SimMIM: 32-px blocks = 2 ViT-B/16
            patches; small blocks let the model copy from neighbours).
        **kwargs: :class:`MaskedImageModel` and :class:`SSLMethod` arguments.
    """

    encoder_sees_mask_tokens = True

    def __init__(self, mask_ratio: float = 0.6, mask_block_size: int = 2, **kwargs: Any) -> None:
        check_open_unit("model.mask_ratio", mask_ratio)
        check_method_sizes(mask_block_size=mask_block_size)
        super().__init__(**kwargs)
        block_masking(1, self.grid, mask_block_size, mask_ratio)  # fails early on a bad ratio or block
        self.mask_ratio = mask_ratio
        self.mask_block_size = mask_block_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.feature_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(self.feature_dim, self.patch_dim)

    def predict(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> Prediction:
        """Encoder over all positions, hidden ones as mask tokens; linear head per patch token."""
        mask = block_masking(images.shape[0], self.grid, self.mask_block_size, self.mask_ratio, self.device, generator)
        tokens = self.run_encoder(self.embed_patches(images, mask, self.mask_token))
        corrupted = patchify(images, self.patch_size) * (1 - mask.unsqueeze(-1))
        return Prediction(self.head(tokens[:, 1:]), corrupted, mask, tokens)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """L1 on the hidden patches."""
        return masked_l1_loss(pred, target, mask)
