"""Projection and prediction MLPs shared by the methods, and MAE's reconstruction decoder."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from sslpipe.errors import ConfigError
from sslpipe.masking import gather_tokens, sincos_pos_embed_2d


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
        raise ConfigError(f"num_layers={num_layers} is invalid: an MLP head needs >= 1 Linear layer")
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


class MAEDecoder(nn.Module):
    """MAE's light Transformer decoder: encoded visible tokens + learned mask tokens -> every patch's pixels.

    The decoder only exists during pretraining, so it can be narrow and shallow (MAE: 8 blocks of
    width 512 behind a ViT-L; 1-2 narrow blocks suffice for 32-px images). Positions are fixed 2-D
    sin-cos codes, a buffer, so the mask tokens learn only "something is missing here".

    Args:
        num_patches: patches per image ``L`` (a square grid).
        encoder_dim: width of the encoder's tokens.
        patch_dim: pixels per patch ``p*p*C`` (the prediction width).
        decoder_dim: decoder width.
        depth: number of Transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: hidden width of each block's MLP over ``decoder_dim``.
    """

    def __init__(
        self,
        num_patches: int,
        encoder_dim: int,
        patch_dim: int,
        decoder_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        side = int(round(num_patches**0.5))
        if side * side != num_patches:
            raise ValueError(f"MAEDecoder needs a square patch grid, got {num_patches} patches")
        if decoder_dim % num_heads:
            raise ValueError(f"decoder_dim {decoder_dim} is not divisible by num_heads {num_heads}")
        self.embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(decoder_dim, side, num_prefix_tokens=1))
        self.blocks = nn.Sequential(*[Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, patch_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():  # MAE's init: xavier-uniform Linears, unit LayerNorms
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict ``(B, L, patch_dim)`` in patch order.

        Args:
            tokens: ``(B, 1 + K, encoder_dim)`` class token then the K visible tokens, in shuffled order.
            ids_restore: ``(B, L)`` from :func:`sslpipe.masking.random_masking`.
        """
        x = self.embed(tokens)
        b, n = ids_restore.shape
        masks = self.mask_token.to(x.dtype).expand(b, n - (x.shape[1] - 1), -1)
        patches = gather_tokens(torch.cat([x[:, 1:], masks], dim=1), ids_restore)  # back to patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])
