"""SimCLR view recipe: shapes, dtypes, randomness under a seed, per-view overrides, config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sslpipe.augment import MultiView, SimCLRViews, eval_transform, simclr_transform
from sslpipe.augment.simclr import SimCLRAugment

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
SIZE = 16
# Every random op off and a crop that always takes the whole (square) image: a deterministic view.
OFF = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), mode="RGB")


def test_views_shape_dtype_and_differ(image):
    transform = SimCLRViews().build(SIZE, MEAN, STD)
    assert isinstance(transform, MultiView)
    torch.manual_seed(0)
    views = transform(image)
    assert isinstance(views, list) and len(views) == 2
    for v in views:
        assert v.shape == (3, SIZE, SIZE) and v.dtype == torch.float32
    assert not torch.equal(views[0], views[1])
    assert len(SimCLRViews(num_views=4).build(SIZE, MEAN, STD)(image)) == 4


def test_grayscale_input_gives_three_channels(image):
    torch.manual_seed(0)
    for v in SimCLRViews().build(SIZE, MEAN, STD)(image.convert("L")):
        assert v.shape == (3, SIZE, SIZE)


def test_seed_determinism(image):
    transform = SimCLRViews().build(SIZE, MEAN, STD)
    torch.manual_seed(123)
    first = transform(image)
    torch.manual_seed(123)
    again = transform(image)
    torch.manual_seed(456)
    other = transform(image)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(first, other))


def test_all_knobs_off_is_the_normalised_image(image):
    """With every random op disabled a view is the resized image, normalised: check against numpy."""
    transform = SimCLRViews(**OFF).build(24, MEAN, STD)  # same size: no resampling either
    torch.manual_seed(0)
    views = transform(image)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    normalised = (pixels - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    expected = torch.from_numpy(normalised).permute(2, 0, 1)
    for v in views:
        torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5)


def test_per_view_overrides_apply(image):
    recipe = SimCLRViews(**OFF, per_view=[{}, {"jitter_p": 1.0, "brightness": 0.8, "crop_scale": (0.2, 0.5)}])
    settings = recipe.view_settings()
    assert settings[0].jitter_p == 0.0 and settings[0].crop_scale == (1.0, 1.0)
    assert settings[1].jitter_p == 1.0 and settings[1].brightness == 0.8 and settings[1].crop_scale == (0.2, 0.5)
    assert settings[1].blur_p == 0.0  # keys not overridden keep the shared value
    transform = recipe.build(SIZE, MEAN, STD)
    plain = eval_transform(SIZE, MEAN, STD)(image)
    seen_second = []
    for seed in range(3):
        torch.manual_seed(seed)
        first, second = transform(image)
        torch.testing.assert_close(first, plain, rtol=1e-5, atol=1e-5)  # the disabled view never changes
        assert not torch.allclose(second, plain, atol=1e-3)  # the enabled one always does
        seen_second.append(second)
    assert not torch.equal(seen_second[0], seen_second[1])


def test_simclr_transform_single_view(image):
    t = simclr_transform(SimCLRAugment(solarize_p=1.0, blur_p=1.0), SIZE, MEAN, STD)
    torch.manual_seed(0)
    out = t(image)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32


@pytest.mark.parametrize("crop_scale", [(0.0, 1.0), (0.9, 0.5), (0.5, 1.5)])
def test_invalid_crop_scale(crop_scale):
    with pytest.raises(ValueError, match="crop_scale"):
        SimCLRViews(crop_scale=crop_scale).build(SIZE, MEAN, STD)
    with pytest.raises(ValueError, match="crop_scale"):
        SimCLRViews(per_view=[{}, {"crop_scale": crop_scale}]).build(SIZE, MEAN, STD)


def test_invalid_per_view():
    with pytest.raises(ValueError, match="per_view has 1 entries but num_views is 2"):
        SimCLRViews(per_view=[{}])
    with pytest.raises(ValueError, match=r"unknown per_view keys \['jiter_p'\]"):
        SimCLRViews(per_view=[{}, {"jiter_p": 1.0}])
    with pytest.raises(ValueError, match="num_views"):
        SimCLRViews(num_views=0)
    with pytest.raises(ValueError, match="at least one"):
        MultiView([])


def test_eval_transform_is_deterministic(image):
    t = eval_transform(SIZE, MEAN, STD, resize_ratio=256 / 224)
    torch.manual_seed(0)
    a = t(image)
    torch.manual_seed(1)
    b = t(image)
    assert a.shape == (3, SIZE, SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b)
