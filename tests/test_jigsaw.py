"""Jigsaw views: tile geometry, the permutation set, tiles being the input's (shuffled) regions."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from sslpipe.augment import JigsawViews, jigsaw_permutations

NO_AUG = dict(hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _image(side: int, seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels), pixels


def _identity_recipe(**kwargs) -> JigsawViews:
    # The grid crop covers the whole image at its own size, tiles are not augmented: tiles are raw cells.
    return JigsawViews(image=NO_AUG, tile=NO_AUG, grid_crop_scale=(1.0, 1.0), num_permutations=20, **kwargs)


def test_permutation_set_is_greedy_farthest_point_selection():
    perms = jigsaw_permutations(12, seed=3)
    assert perms.shape == (12, 9)
    assert all(sorted(p) == list(range(9)) for p in perms.tolist())
    assert len({tuple(p) for p in perms.tolist()}) == 12
    # Independent check over all 9! permutations: each chosen permutation's minimum Hamming distance
    # to the ones before it is the largest any permutation achieves at that step.
    every = np.array(list(itertools.permutations(range(9))))
    for k in range(1, len(perms)):
        dist_all = np.stack([(every != perms[j]).sum(1) for j in range(k)]).min(0)
        best = dist_all.max()
        min_to_chosen = min(int((perms[k] != perms[j]).sum()) for j in range(k))
        assert min_to_chosen == best, f"step {k}: chose distance {min_to_chosen}, best possible {best}"
    assert jigsaw_permutations(12, seed=3) is perms  # cached per (size, seed)
    assert not np.array_equal(jigsaw_permutations(12, seed=4), perms)
    with pytest.raises(ValueError, match="num_permutations"):
        jigsaw_permutations(0)


def test_tiles_are_the_input_regions_in_permutation_order():
    image, pixels = _image(30)
    transform = _identity_recipe(grid_size=30, tile_jitter=0).build(30, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    perms = jigsaw_permutations(20, seed=0)
    seen = set()
    for _ in range(10):
        view, tiles, index = transform(image)
        assert view.shape == (3, 30, 30) and tiles.shape == (9, 3, 10, 10)
        assert 0 <= int(index) < 20
        seen.add(int(index))
        for pos in range(9):
            cell = int(perms[int(index)][pos])
            r, c = divmod(cell, 3)
            expected = torch.from_numpy(pixels[r * 10 : (r + 1) * 10, c * 10 : (c + 1) * 10]).permute(2, 0, 1) / 255.0
            torch.testing.assert_close(tiles[pos], expected, atol=1e-6, rtol=0)
    assert len(seen) > 1  # the permutation is drawn per call


def test_jittered_tiles_are_random_windows_inside_their_cell():
    image, pixels = _image(30, seed=1)
    transform = _identity_recipe(grid_size=30, tile_jitter=3).build(30, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    perms = jigsaw_permutations(20, seed=0)
    offsets = set()
    for _ in range(5):
        _, tiles, index = transform(image)
        assert tiles.shape == (9, 3, 7, 7)
        for pos in range(9):
            r, c = divmod(int(perms[int(index)][pos]), 3)
            matches = [
                (dy, dx)
                for dy in range(4)
                for dx in range(4)
                if np.allclose(
                    tiles[pos].permute(1, 2, 0).numpy() * 255,
                    pixels[r * 10 + dy : r * 10 + dy + 7, c * 10 + dx : c * 10 + dx + 7],
                    atol=1e-3,
                )
            ]
            assert matches, f"tile {pos} is not a 7x7 window of cell {(r, c)}"
            offsets.update(matches)
    assert len(offsets) > 1  # the gap moves


def test_views_sizes_and_collation():
    image, _ = _image(8)
    recipe = JigsawViews(grid_size=30, tile_jitter=2, tile_size=16, num_permutations=50)
    transform = recipe.build(32, (0.3, 0.3, 0.3), (0.4, 0.4, 0.4))
    view, tiles, index = transform(image)
    assert view.shape == (3, 32, 32) and tiles.shape == (9, 3, 16, 16) and index.dtype == torch.int64
    views = default_collate([transform(image) for _ in range(4)])
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32), (4, 9, 3, 16, 16), (4,)]
    # Per-tile augmentation is independent: two tiles cut from the same flat image differ after jitter.
    flat = Image.new("RGB", (30, 30), (120, 80, 40))
    tiles = JigsawViews(tile=dict(jitter_p=1.0, hflip_p=0.0), grid_size=30, num_permutations=5).build(
        30, (0, 0, 0), (1, 1, 1)
    )(flat)[1]
    assert len({round(float(t.mean()), 4) for t in tiles}) > 1


def test_geometry_defaults_and_errors():
    assert JigsawViews(grid_size=255, tile_jitter=21).geometry(224) == (255, 21, 64)  # PIRL's ImageNet tiles
    assert JigsawViews().geometry(32) == (30, 2, 8)  # a quarter-cell gap by default
    with pytest.raises(ValueError, match="multiple of 3"):
        JigsawViews(grid_size=32)
    with pytest.raises(ValueError, match="tile_jitter"):
        JigsawViews(grid_size=30, tile_jitter=10).geometry(32)
    with pytest.raises(ValueError, match="unknown tile"):
        JigsawViews(tile={"colour": 1})
