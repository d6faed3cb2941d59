"""Masked image modelling on a timm ViT: MAE (He et al., 2022), SimMIM (Xie et al., 2022), denoising autoencoder.

BERT's recipe for images: hide or corrupt part of the input and predict it from the rest. The
energy is shaped by the architecture (the encoder never sees what it must predict), not by negatives.

The shared part, :class:`MaskedImageModel`, lives here; each variant has its own file:

* :class:`~sslpipe.methods.mae.MaskedAutoencoder` - the encoder sees only the visible patches (+ class token); a light
  decoder adds mask tokens and predicts every patch; MSE on the hidden patches.
* :class:`~sslpipe.methods.simmim.SimMIM` - mask tokens enter the encoder in place of hidden patches; a linear head
  predicts pixels; L1 on the hidden patches.
* :class:`~sslpipe.methods.dae.DenoisingAutoencoder` - Gaussian noise instead of masking; a linear head predicts the
  clean pixels of every patch; MSE.

All three replace the ViT's learned position embedding by fixed 2-D sin-cos codes and evaluate
(``forward``) on full, uncorrupted images.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Optional

import torch
from torch import nn

from sslpipe.callbacks import ReconstructionLogger
from sslpipe.masking import patchify, sincos_pos_embed_2d, unpatchify
from sslpipe.methods.base import SSLMethod, SSLOutput
from sslpipe.optim import OptimizerName


class Prediction(NamedTuple):
    """One corrupt-and-predict pass.

    Attributes:
        patches: ``(B, L, p*p*3)`` predicted pixels of every patch, in patch order.
        corrupted: ``(B, L, p*p*3)`` what the model was shown (hidden patches zeroed), for display.
        mask: ``(B, L)`` 1 on the patches the loss scores; ``None`` scores all (denoising).
        tokens: ``(B, 1 + T, D)`` encoder output (class token first) the online probe pools.
    """

    patches: torch.Tensor
    corrupted: torch.Tensor
    mask: Optional[torch.Tensor]
    tokens: torch.Tensor


class MaskedImageModel(SSLMethod):
    """Shared ViT plumbing of the masked/denoising methods; subclasses define the corruption and the loss.

    The online probe trains on the pooled encoder output the training step computes anyway (detached):
    for MAE that is the visible patches only, a free but pessimistic proxy of the full-image features
    the validation probe sees through :meth:`forward`. It sits behind a non-affine BatchNorm, as in MAE
    (``probe_batch_norm``, on by default here).

    Subclasses set ``encoder_sees_mask_tokens`` when hidden patches enter the encoder as mask tokens
    (SimMIM): the mask then also marks the token positions the probe's mean pooling leaves out.

    Args:
        pool: features for evaluation and the online probe: the ``cls`` token or the ``mean`` of the patch tokens.
        reconstruction_every_n_epochs: save input / corrupted / reconstructed images every N epochs
            (and after the last) to ``<run dir>/reconstructions/``; 0 disables.
        reconstruction_images: how many validation images those grids show.
        backbone: a timm ViT name; set ``backbone_kwargs: {patch_size: 4}`` for 32-px images.
        optimizer: AdamW, as in MAE and SimMIM.
        probe_batch_norm: the online probe's affine-free BatchNorm (MAE's linear-probe recipe). Reconstruction
            features share a large common offset with tiny per-sample spread (measured on digits: mean norm 14,
            per-dim std 0.08); a bare linear layer stays at chance on them.
        **kwargs: the shared :class:`SSLMethod` arguments.
    """

    encoder_sees_mask_tokens = False

    def __init__(
        self,
        pool: Literal["cls", "mean"] = "cls",
        reconstruction_every_n_epochs: int = 10,
        reconstruction_images: int = 8,
        backbone: str = "vit_tiny_patch16_224",
        optimizer: OptimizerName = "adamw",
        probe_batch_norm: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, optimizer=optimizer, probe_batch_norm=probe_batch_norm, **kwargs)
        vit = self.backbone
        if (
            not all(hasattr(vit, a) for a in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm"))
            or vit.cls_token is None
        ):
            raise ValueError(
                f"backbone {backbone!r} is not a timm VisionTransformer with a class token; "
                "use e.g. vit_tiny_patch16_224"
            )
        if (
            getattr(vit, "num_reg_tokens", 0)
            or getattr(vit, "no_embed_class", False)
            or getattr(vit, "dynamic_img_size", False)
        ):
            raise ValueError(
                f"backbone {backbone!r}: register tokens, no_embed_class and dynamic_img_size are not supported here"
            )
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_dim = self.patch_size**2 * 3
        # Fixed sin-cos positions (MAE): nothing for the mask tokens to learn a shortcut from, and no
        # gradient, so the optimiser (which takes requires_grad parameters only) leaves them alone.
        vit.pos_embed = nn.Parameter(sincos_pos_embed_2d(self.feature_dim, self.grid), requires_grad=False)
        self.reconstruction_every_n_epochs = reconstruction_every_n_epochs
        self.reconstruction_images = reconstruction_images

    # ------------------------------------------------------------------ encoder pieces
    def embed_patches(
        self, images: torch.Tensor, mask: Optional[torch.Tensor] = None, mask_token: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``(B, L, D)`` patch tokens with positions; where ``mask`` is 1 the token becomes ``mask_token``."""
        x = self.backbone.patch_embed(images)
        if mask is not None and mask_token is not None:
            x = torch.where(mask.bool().unsqueeze(-1), mask_token.to(x.dtype), x)
        return x + self.backbone.pos_embed[:, 1:].to(x.dtype)

    def run_encoder(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Prepend the class token and run the Transformer: ``(B, N, D)`` -> normalised ``(B, 1 + N, D)``."""
        vit = self.backbone
        cls = (vit.cls_token + vit.pos_embed[:, :1]).to(patch_tokens.dtype).expand(patch_tokens.shape[0], -1, -1)
        x = vit.norm_pre(torch.cat([cls, patch_tokens], dim=1))
        return vit.norm(vit.blocks(x))

    def pooled(self, tokens: torch.Tensor, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The class token or the mean of the patch tokens, per ``pool``.

        ``hidden`` ``(B, N)`` (1 = masked) leaves the mask-token positions out of the mean: during SimMIM
        training the online probe then sees the visible patches' tokens, closer to the unmasked
        features it is evaluated on.
        """
        if self.pool == "cls":
            return tokens[:, 0]
        patches = tokens[:, 1:]
        if hidden is None:
            return patches.mean(dim=1)
        visible = (1 - hidden.to(patches.dtype)).unsqueeze(-1)
        return (patches * visible).sum(dim=1) / visible.sum(dim=1).clamp_min(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation features of full, unmasked images."""
        return self.pooled(self.run_encoder(self.embed_patches(images)))

    # ------------------------------------------------------------------ what subclasses implement
    def predict(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> "Prediction":
        """Corrupt ``images`` (randomness from ``generator`` when given) and predict their patches."""
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Reconstruction loss on the scored patches."""
        raise NotImplementedError

    def ssl_step(self, views: list[torch.Tensor], indices: Optional[torch.Tensor] = None) -> SSLOutput:
        """Reconstruction loss of one view; the probe gets the pooled tokens the encoder produced anyway (detached)."""
        images = views[0]
        out = self.predict(images)
        loss = self.loss(out.patches, patchify(images, self.patch_size), out.mask)
        hidden_tokens = out.mask if self.encoder_sees_mask_tokens else None
        return SSLOutput(loss=loss, features=self.pooled(out.tokens, hidden_tokens))

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(corrupted, reconstruction)`` images for display, in the input's normalisation.

        Visible patches of masked models are pasted from the input (only hidden ones are trained).
        """
        pred, corrupted, mask = self.predict(images, generator)[:3]
        target = patchify(images, self.patch_size)
        pred = self.to_pixels(pred.float(), target)
        if mask is not None:
            pred = pred * mask.unsqueeze(-1) + target * (1 - mask.unsqueeze(-1))
        return unpatchify(corrupted, self.patch_size, grid=self.grid), unpatchify(pred, self.patch_size, grid=self.grid)

    def to_pixels(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Map predictions to pixel space (identity unless the target was per-patch normalised)."""
        return pred

    def on_fit_start(self) -> None:
        """On CPUs switch timm's attention to the plain matmul-softmax path.

        PyTorch's CPU flash-attention kernel is slow for these short sequences, above all its bf16
        backward (measured: a 32-px MAE step 1.9x faster, SimMIM 1.8x). GPUs keep the fused kernel.
        """
        if self.device.type == "cpu":
            for module in self.modules():
                if hasattr(module, "fused_attn"):
                    module.fused_attn = False

    def configure_callbacks(self) -> list:
        """Attach the reconstruction-image writer, so configs need no callback section."""
        if self.reconstruction_every_n_epochs <= 0:
            return []
        return [ReconstructionLogger(self.reconstruction_every_n_epochs, self.reconstruction_images)]
