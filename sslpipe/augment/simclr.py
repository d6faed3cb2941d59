"""The SimCLR augmentation recipe on torchvision.transforms.v2, and the pieces views are built from.

A *view recipe* (:class:`ViewRecipe`) is what a config names under ``data.views``; the DataModule
calls ``recipe.build(image_size, mean, std)`` once the dataset's size and statistics are known, so
a recipe never repeats them. Methods pick the recipe that fits them (SimCLR/MoCo: two SimCLR views;
MAE: one light crop; PIRL: image + jigsaw).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Optional, Sequence

import torch
from torchvision.transforms import v2

Transform = Callable[[Any], Any]


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


@dataclass
class SimCLRAugment:
    """Every knob of one SimCLR-style view (defaults: SimCLR's ImageNet recipe)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1  # kernel side = this share of the image side (SimCLR: 10%), made odd
    solarize_p: float = 0.0


def simclr_transform(aug: SimCLRAugment, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Transform:
    """Build one view's pipeline: PIL/tensor image in, normalised float ``(3, S, S)`` tensor out.

    Ops run on uint8 tensors (converted first) because v2 is fastest there.
    """
    if not 0 < aug.crop_scale[0] <= aug.crop_scale[1] <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {aug.crop_scale}")
    ops: list[Transform] = [
        v2.ToImage(),
        v2.RGB(),
        v2.RandomResizedCrop(image_size, scale=aug.crop_scale, ratio=aug.crop_ratio, antialias=True),
    ]
    if aug.hflip_p > 0:
        ops.append(v2.RandomHorizontalFlip(p=aug.hflip_p))
    if aug.jitter_p > 0:
        jitter = v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)
        ops.append(v2.RandomApply([jitter], p=aug.jitter_p))
    if aug.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(p=aug.grayscale_p))
    if aug.blur_p > 0:
        kernel = max(3, int(aug.blur_kernel_fraction * image_size) // 2 * 2 + 1)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=aug.blur_sigma)], p=aug.blur_p))
    if aug.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=aug.solarize_p))
    return v2.Compose(ops + _to_normalised_tensor(mean, std))


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], resize_ratio: float = 1.0
) -> Transform:
    """Deterministic evaluation transform: resize the short side to ``image_size * resize_ratio``, centre-crop.

    ``resize_ratio`` 1.0 suits small images stored at training size (digits, CIFAR); 256/224 is the
    ImageNet convention for folders of photographs.
    """
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize(round(image_size * resize_ratio), antialias=True),
            v2.CenterCrop(image_size),
            *_to_normalised_tensor(mean, std),
        ]
    )


class MultiView:
    """Apply N transforms to one image and return the N views as a list (asymmetric views allowed)."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        if not transforms:
            raise ValueError("MultiView needs at least one transform")
        self.transforms = list(transforms)

    def __call__(self, image: Any) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]

    def __repr__(self) -> str:
        return f"MultiView({len(self.transforms)} views)"


class ViewRecipe:
    """Base class of ``data.views``: turns (image size, normalisation) into the training transform."""

    def build(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Transform:
        """Return the callable applied to each training image."""
        raise NotImplementedError


class SimCLRViews(ViewRecipe):
    """N SimCLR views; every :class:`SimCLRAugment` field is a knob, ``per_view`` overrides any of them per view.

    Example (BYOL's asymmetric blur/solarisation)::

        per_view: [{blur_p: 1.0}, {blur_p: 0.1, solarize_p: 0.2}]
    """

    def __init__(
        self,
        num_views: int = 2,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_p: float = 0.5,
        jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_fraction: float = 0.1,
        solarize_p: float = 0.0,
        per_view: Optional[list[dict[str, Any]]] = None,
    ) -> None:
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        if per_view is not None and len(per_view) != num_views:
            raise ValueError(
                f"per_view has {len(per_view)} entries but num_views is {num_views}: give one dict per view"
            )
        names = {f.name for f in fields(SimCLRAugment)}
        self.base = SimCLRAugment(**{k: v for k, v in locals().items() if k in names})
        self.num_views = num_views
        self.per_view = per_view or [{} for _ in range(num_views)]
        for overrides in self.per_view:
            unknown = set(overrides) - names
            if unknown:
                raise ValueError(f"unknown per_view keys {sorted(unknown)}; valid keys: {sorted(names)}")

    def view_settings(self) -> list[SimCLRAugment]:
        """The resolved settings of each view."""
        return [replace(self.base, **overrides) for overrides in self.per_view]

    def build(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> MultiView:
        """N independent SimCLR pipelines wrapped in a :class:`MultiView`."""
        return MultiView([simclr_transform(a, image_size, mean, std) for a in self.view_settings()])
