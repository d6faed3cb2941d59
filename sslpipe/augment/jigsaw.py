"""PIRL's views: one SimCLR-style image view plus a jigsaw of 9 independently augmented, shuffled tiles.

The jigsaw follows Noroozi & Favaro (2016) as used by PIRL (Misra & van der Maaten, 2020): a
random resized crop of the image (255 px for ImageNet) is cut into a 3x3 grid of cells (85 px),
each tile is a random crop of its cell that is ``jitter`` pixels smaller (64 px), so neighbouring
tiles never share an edge the network could match instead of learning content. Each tile gets its
own photometric augmentation, then the tiles are shuffled by a permutation drawn from a fixed set
of maximally different permutations.

With ``data.augment_on device`` the workers produce the same geometry in uint8 (image crop, grid crop, tile
crops, flips, the shuffle) and each tile's photometric ops run batched on the device, one independent draw
per tile (:class:`JigsawBatched`).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import fields, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from sslpipe.augment.batched import BatchedPhotometric
from sslpipe.augment.simclr import SimCLRAugment, Transform, ViewRecipe, geometric_transform, simclr_transform

GRID = 3
NUM_TILES = GRID * GRID

# PIRL's per-patch augmentation: colour jitter (0.4, 0.4, 0.4, 0.2), grayscale 0.2, horizontal flip.
# The tile is already a crop, so the tile pipeline only resizes it (scale and ratio fixed at 1).
DEFAULT_TILE_AUG = SimCLRAugment(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    hflip_p=0.5,
    jitter_p=0.8,
    brightness=0.4,
    contrast=0.4,
    saturation=0.4,
    hue=0.2,
    grayscale_p=0.2,
    blur_p=0.0,
)


@functools.lru_cache(maxsize=8)
def jigsaw_permutations(num: int = 1000, seed: int = 0) -> np.ndarray:
    """``num`` permutations of the 9 tiles, chosen greedily to be as different from each other as possible.

    Farthest-point selection under the Hamming distance over all 9! = 362,880 permutations: each
    new permutation maximises its minimum distance to those already chosen (ties broken by a seeded
    shuffle). Distinct permutations are what makes the jigsaw hard to undo from tile statistics.

    Returns:
        A read-only ``(num, 9)`` int64 array; row ``p`` means "position i shows cell ``p[i]``".
    """
    total = int(np.prod(np.arange(1, NUM_TILES + 1)))
    if not 1 <= num <= total:
        raise ValueError(f"num_permutations must be in [1, {total}], got {num}")
    perms = np.array(list(itertools.permutations(range(NUM_TILES))), dtype=np.uint8)
    perms = perms[np.random.default_rng(seed).permutation(total)]  # argmax picks the first tie: seeded
    columns = np.ascontiguousarray(perms.T)  # (9, 9!): one contiguous comparison per tile position
    chosen = [0]
    min_dist = np.full(total, NUM_TILES, dtype=np.uint8)
    for _ in range(num - 1):
        last = perms[chosen[-1]]
        dist = np.zeros(total, dtype=np.uint8)
        for pos in range(NUM_TILES):
            dist += columns[pos] != last[pos]
        np.minimum(min_dist, dist, out=min_dist)
        chosen.append(int(min_dist.argmax()))
    out = perms[chosen].astype(np.int64)
    out.flags.writeable = False
    return out


class JigsawTransform:
    """PIL image in; ``[image view (3,S,S), tiles (9,3,t,t), permutation index ()]`` out.

    ``tiles[i]`` is cell ``permutations[index][i]`` of the grid (cells numbered row-major).
    """

    def __init__(
        self,
        image_transform: Transform,
        grid_transform: Transform,
        tile_transform: Transform,
        permutations: np.ndarray,
        jitter: int,
    ) -> None:
        self.image_transform = image_transform
        self.grid_transform = grid_transform
        self.tile_transform = tile_transform
        self.permutations = torch.tensor(np.asarray(permutations))
        self.jitter = jitter

    def __call__(self, image: Any) -> list[torch.Tensor]:
        view = self.image_transform(image)
        grid = self.grid_transform(image)  # uint8 (3, G, G)
        cell = grid.shape[-1] // GRID
        side = cell - self.jitter
        index = torch.randint(len(self.permutations), ())
        offsets = torch.randint(self.jitter + 1, (NUM_TILES, 2)).tolist()
        tiles = []
        for pos, source in enumerate(self.permutations[index].tolist()):
            row, col = divmod(source, GRID)
            dy, dx = offsets[pos]
            y, x = row * cell + dy, col * cell + dx
            tiles.append(self.tile_transform(grid[:, y : y + side, x : x + side]))
        return [view, torch.stack(tiles), index]

    def __repr__(self) -> str:
        return f"JigsawTransform({len(self.permutations)} permutations, jitter {self.jitter})"


class JigsawBatched:
    """The device half of PIRL's views: ``[image (B,3,S,S), tiles (B,9,3,t,t), index (B,)]`` uint8 views in,
    the image and every tile augmented independently and normalised, the permutation index passed through."""

    def __init__(self, image: BatchedPhotometric, tile: BatchedPhotometric) -> None:
        self.image, self.tile = image, tile

    def __call__(self, views: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        if len(views) != 3:
            raise ValueError(f"expected [image, tiles, permutation index] from JigsawViews, got {len(views)} views")
        image, tiles, index = views
        b, t = tiles.shape[:2]
        tiles = self.tile(tiles.flatten(0, 1), generator).unflatten(0, (b, t))
        return [self.image(image, generator), tiles, index]

    def __repr__(self) -> str:
        return f"JigsawBatched(image={self.image}, tile={self.tile})"


class JigsawViews(ViewRecipe):
    """PIRL's view recipe: the image ``I`` and its jigsaw ``I^t``.

    Args:
        image: overrides of the image view's :class:`SimCLRAugment` fields (default: SimCLR's recipe).
        tile: overrides of the per-tile :class:`SimCLRAugment` fields (default: PIRL's per-patch jitter,
            grayscale and flip; scale/ratio stay 1 since the tile is already a crop).
        grid_size: side of the crop cut into the 3x3 grid (PIRL: 255); ``None`` = the largest
            multiple of 3 not above the image size. Must be a multiple of 3.
        grid_crop_scale: area range of that random resized crop (PIRL: 0.6-1.0).
        tile_jitter: pixels a tile is smaller than its cell, i.e. the random gap between tiles
            (PIRL: 21 of 85); ``None`` = a quarter of the cell.
        tile_size: side the tiles are resized to; ``None`` keeps ``cell - tile_jitter``. Smaller tiles
            cut the backbone's cost, which is 9 tile passes per image.
        num_permutations: size of the fixed permutation set (Noroozi & Favaro: 1000).
        permutation_seed: seed of the permutation-set selection.
    """

    def __init__(
        self,
        image: Optional[dict[str, Any]] = None,
        tile: Optional[dict[str, Any]] = None,
        grid_size: Optional[int] = None,
        grid_crop_scale: tuple[float, float] = (0.6, 1.0),
        tile_jitter: Optional[int] = None,
        tile_size: Optional[int] = None,
        num_permutations: int = 1000,
        permutation_seed: int = 0,
    ) -> None:
        names = {f.name for f in fields(SimCLRAugment)}
        for label, overrides in (("image", image), ("tile", tile)):
            unknown = set(overrides or {}) - names
            if unknown:
                raise ValueError(f"unknown {label} augmentation keys {sorted(unknown)}; valid keys: {sorted(names)}")
        if grid_size is not None and (grid_size < GRID or grid_size % GRID):
            raise ValueError(f"grid_size must be a positive multiple of {GRID}, got {grid_size}")
        if not 0 < grid_crop_scale[0] <= grid_crop_scale[1] <= 1:
            raise ValueError(f"grid_crop_scale must satisfy 0 < min <= max <= 1, got {grid_crop_scale}")
        self.image_aug = replace(SimCLRAugment(), **(image or {}))
        self.tile_aug = replace(DEFAULT_TILE_AUG, **(tile or {}))
        self.grid_size = grid_size
        self.grid_crop_scale = tuple(grid_crop_scale)
        self.tile_jitter = tile_jitter
        self.tile_size = tile_size
        self.num_permutations = num_permutations
        self.permutation_seed = permutation_seed

    def geometry(self, image_size: int) -> tuple[int, int, int]:
        """``(grid_size, tile_jitter, tile_size)`` resolved for ``image_size``."""
        grid = self.grid_size or GRID * (image_size // GRID)
        cell = grid // GRID
        jitter = cell // 4 if self.tile_jitter is None else self.tile_jitter
        if not 0 <= jitter < cell:
            raise ValueError(f"tile_jitter must be in [0, {cell}) for {cell}-px cells (grid_size {grid}), got {jitter}")
        return grid, jitter, self.tile_size or cell - jitter

    def _transform(self, image_size: int, image: Transform, tile: Callable[[int], Transform]) -> JigsawTransform:
        grid, jitter, tile_size = self.geometry(image_size)
        grid_transform = v2.Compose(
            [v2.ToImage(), v2.RGB(), v2.RandomResizedCrop(grid, scale=self.grid_crop_scale, antialias=True)]
        )
        return JigsawTransform(
            image_transform=image,
            grid_transform=grid_transform,
            tile_transform=tile(tile_size),
            permutations=jigsaw_permutations(self.num_permutations, self.permutation_seed),
            jitter=jitter,
        )

    def build(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> JigsawTransform:
        """The image pipeline, the grid crop, the per-tile pipeline and the permutation set, all per sample."""
        image = simclr_transform(self.image_aug, image_size, mean, std)
        return self._transform(image_size, image, lambda side: simclr_transform(self.tile_aug, side, mean, std))

    def build_geometric(self, image_size: int) -> JigsawTransform:
        """The same geometry with uint8 image and tiles: no photometric op, no normalisation."""
        image = geometric_transform(self.image_aug, image_size)
        return self._transform(image_size, image, lambda side: geometric_transform(self.tile_aug, side))

    def build_batched(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> JigsawBatched:
        """The image view's and the tiles' photometric ops and normalisation, batched (one draw per tile)."""
        tile_size = self.geometry(image_size)[2]
        return JigsawBatched(
            BatchedPhotometric(self.image_aug, image_size, mean, std),
            BatchedPhotometric(self.tile_aug, tile_size, mean, std),
        )
