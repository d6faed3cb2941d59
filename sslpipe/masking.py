"""Patch-level tensor tools for masked image modelling: patchify, random masking, token gathers, 2-D sin-cos.

Pure functions of tensors, no modules. Conventions shared by every caller:

* a patch is flattened in ``(row, column, channel)`` order, patches in row-major grid order, so
  ``patchify`` maps ``(B, C, H, W)`` to ``(B, L, p*p*C)`` with ``L = (H/p) * (W/p)``;
* a mask is ``(B, L)`` float with **1 = masked (hidden)**, 0 = visible, in the original patch order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut ``(B, C, H, W)`` images into ``(B, L, p*p*C)`` flattened non-overlapping patches."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size {p}; pick a patch size that divides it")
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(
    patches: torch.Tensor, patch_size: int, channels: int = 3, grid: Optional[tuple[int, int]] = None
) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, L, p*p*C)`` back to ``(B, C, H, W)``.

    ``grid`` is ``(rows, columns)`` of patches; ``None`` assumes a square grid.
    """
    b, n, d = patches.shape
    p = patch_size
    if d != p * p * channels:
        raise ValueError(f"patch width {d} != patch_size**2 * channels = {p * p * channels}; check patch_size/channels")
    if grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid=(rows, columns)")
        grid = (side, side)
    gh, gw = grid
    x = patches.reshape(b, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return x.reshape(b, channels, gh * p, gw * p)


@dataclass
class PatchMask:
    """One random mask per sample, in the three forms masked models need.

    Attributes:
        ids_keep: ``(B, K)`` indices of the visible patches (in shuffled order).
        ids_restore: ``(B, L)`` where each original position sits in the shuffled sequence;
            gathering a shuffled sequence with it puts tokens back in patch order.
        mask: ``(B, L)`` float, 1 where the patch is hidden, in patch order.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor

    @property
    def ids_shuffle(self) -> torch.Tensor:
        """``(B, L)`` the shuffled order (visible first): the inverse permutation of ``ids_restore``."""
        return torch.argsort(self.ids_restore, dim=1)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches left visible when hiding ``mask_ratio`` of ``num_patches`` (at least one stays visible)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    generator: Optional[torch.Generator] = None,
) -> PatchMask:
    """Hide a uniformly random ``mask_ratio`` share of the patches of each sample, independently per sample.

    Sorting i.i.d. uniform noise gives a random permutation per row in one batched op; the first
    ``K`` positions of the permutation stay visible. Every sample hides exactly ``L - K`` patches.
    """
    keep = num_visible(num_patches, mask_ratio)
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # shuffled order -> patch order
    return PatchMask(ids_keep=ids_shuffle[:, :keep], ids_restore=ids_restore, mask=mask)


def block_masking(
    batch_size: int,
    grid: tuple[int, int],
    block: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``(B, rows*cols)`` mask hiding random ``block x block`` squares of patches (SimMIM's mask patch size).

    A random mask is drawn on the coarse grid of blocks and each block's value copied to its patches,
    so the hidden share is exact on the block grid. ``block`` must divide both grid sides.
    """
    rows, cols = grid
    if block < 1 or rows % block or cols % block:
        raise ValueError(f"mask block {block} must divide the {rows}x{cols} patch grid; use 1 or a divisor")
    coarse = random_masking(batch_size, (rows // block) * (cols // block), mask_ratio, device, generator).mask
    coarse = coarse.reshape(batch_size, rows // block, cols // block)
    return coarse.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2).reshape(batch_size, rows * cols)


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Pick ``tokens[b, ids[b, i]]`` for every sample: ``(B, L, D)``, ``(B, K)`` -> ``(B, K, D)``."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def shuffle_tokens(tokens: torch.Tensor, mask: PatchMask) -> torch.Tensor:
    """Reorder ``(B, L, D)`` patch-order tokens into the mask's shuffled order (visible first)."""
    return gather_tokens(tokens, mask.ids_shuffle)


def unshuffle_tokens(tokens: torch.Tensor, mask: PatchMask) -> torch.Tensor:
    """Put ``(B, L, D)`` shuffled-order tokens back in patch order (inverse of :func:`shuffle_tokens`)."""
    return gather_tokens(tokens, mask.ids_restore)


def sincos_pos_embed_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``(N, embed_dim)`` Transformer sin-cos codes of 1-D ``positions``: first half sines, second half cosines."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid: tuple[int, int] | int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings ``(1, num_prefix_tokens + rows*cols, embed_dim)`` (fp32).

    Half of the channels encode the row, half the column (MAE's choice); prefix tokens (the class
    token) get zeros, i.e. no position.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    emb = torch.cat(
        [sincos_pos_embed_1d(embed_dim // 2, r.flatten()), sincos_pos_embed_1d(embed_dim // 2, c.flatten())], dim=1
    )
    emb = torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=emb.dtype), emb])
    return emb.float().unsqueeze(0)
