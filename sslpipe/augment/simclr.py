"""The SimCLR augmentation recipe on torchvision.transforms.v2, and the pieces views are built from.

A *view recipe* (:class:`ViewRecipe`) is what a config names under ``data.views``; the DataModule
calls ``recipe.build(image_size, mean, std)`` (``data.augment_on cpu``: all of it per sample in the loader
workers) or ``recipe.build_geometric(image_size)`` + ``recipe.build_batched(image_size, mean, std)``
(``device``: crop/flip per sample in the workers, photometric ops batched on the device, see
:mod:`sslpipe.augment.batched`) once the dataset's size and statistics are known, so a recipe never repeats
them. Methods pick the recipe that fits them (SimCLR/MoCo: two SimCLR views; MAE: one light crop; PIRL: image
+ jigsaw).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Optional, Sequence

import torch
from torchvision.transforms import v2

from sslpipe.augment.batched import (
    SOLARIZE_THRESHOLD,
    BatchedAugment,
    BatchedPhotometric,
    BatchedViews,
    blur_kernel_size,
)

Transform = Callable[[Any], Any]


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list[Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def _check_crop(aug: SimCLRAugment) -> None:
    if not 0 < aug.crop_scale[0] <= aug.crop_scale[1] <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {aug.crop_scale}")


def geometric_ops(aug: SimCLRAugment, image_size: int) -> list[Transform]:
    """The per-sample geometric part of a view: to a uint8 RGB tensor, random resized crop, horizontal flip."""
    _check_crop(aug)
    ops: list[Transform] = [
        v2.ToImage(),
        v2.RGB(),
        v2.RandomResizedCrop(image_size, scale=aug.crop_scale, ratio=aug.crop_ratio, antialias=True),
    ]
    if aug.hflip_p > 0:
        ops.append(v2.RandomHorizontalFlip(p=aug.hflip_p))
    return ops


def photometric_ops(aug: SimCLRAugment, image_size: int) -> list[Transform]:
    """The per-sample photometric part on uint8 tensors: colour jitter, grayscale, blur, solarisation.

    :class:`sslpipe.augment.batched.BatchedPhotometric` is the same distribution over a batch on the device.
    """
    ops: list[Transform] = []
    if aug.jitter_p > 0:
        jitter = v2.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)
        ops.append(v2.RandomApply([jitter], p=aug.jitter_p))
    if aug.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(p=aug.grayscale_p))
    if aug.blur_p > 0:
        ops.append(
            v2.RandomApply([v2.GaussianBlur(blur_kernel_size(aug, image_size), sigma=aug.blur_sigma)], p=aug.blur_p)
        )
    if aug.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=aug.solarize_p))
    return ops


def simclr_transform(aug: SimCLRAugment, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Transform:
    """Build one view's whole pipeline per sample: PIL/tensor image in, normalised float ``(3, S, S)`` tensor out.

    Ops run on uint8 tensors (converted first) because v2 is fastest there.
    """
    return v2.Compose(
        geometric_ops(aug, image_size) + photometric_ops(aug, image_size) + _to_normalised_tensor(mean, std)
    )


def geometric_transform(aug: SimCLRAugment, image_size: int) -> Transform:
    """One view's worker part for ``data.augment_on device``: PIL/tensor image in, uint8 ``(3, S, S)`` tensor out."""
    return v2.Compose(geometric_ops(aug, image_size))


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
    """Base class of ``data.views``: turns (image size, normalisation) into the training transform.

    Two ways to run a recipe (``data.augment_on``): :meth:`build` is the whole pipeline per sample in the loader
    workers (``cpu``); :meth:`build_geometric` (workers: decode, crop, flip to uint8) plus :meth:`build_batched`
    (the photometric ops and normalisation over the batch on the device) is ``device``. A recipe made of
    SimCLR-style views only implements :meth:`view_settings`; others override the three builders.
    """

    def view_settings(self) -> list[SimCLRAugment]:
        """The settings of each view, in the order the views are returned."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its views as SimCLRAugment settings")

    def build(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Transform:
        """The callable applied to each training image: every view's whole pipeline (``data.augment_on cpu``)."""
        return MultiView([simclr_transform(a, image_size, mean, std) for a in self.view_settings()])

    def build_geometric(self, image_size: int) -> Transform:
        """The worker half for ``data.augment_on device``: each view decoded, cropped and flipped to uint8."""
        return MultiView([geometric_transform(a, image_size) for a in self.view_settings()])

    def build_batched(self, image_size: int, mean: Sequence[float], std: Sequence[float]) -> BatchedAugment:
        """The device half for ``data.augment_on device``: ``(uint8 views, generator) -> normalised float views``."""
        return BatchedViews([BatchedPhotometric(a, image_size, mean, std) for a in self.view_settings()])


class SimCLRViews(ViewRecipe):
    """N SimCLR views; every :class:`SimCLRAugment` field is a knob, ``per_view`` overrides any of them per view.

    The defaults here are SimCLR's ImageNet recipe and the only statement of it: :class:`SimCLRAugment` reads them.

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


_VIEW_DEFAULTS = {name: p.default for name, p in inspect.signature(SimCLRViews.__init__).parameters.items()}


@dataclass
class SimCLRAugment:
    """Every knob of one SimCLR-style view; the defaults are :class:`SimCLRViews`' (SimCLR's ImageNet recipe).

    ``blur_kernel_fraction``: kernel side = this share of the image side (SimCLR: 10%), made odd.
    """

    crop_scale: tuple[float, float] = _VIEW_DEFAULTS["crop_scale"]
    crop_ratio: tuple[float, float] = _VIEW_DEFAULTS["crop_ratio"]
    hflip_p: float = _VIEW_DEFAULTS["hflip_p"]
    jitter_p: float = _VIEW_DEFAULTS["jitter_p"]
    brightness: float = _VIEW_DEFAULTS["brightness"]
    contrast: float = _VIEW_DEFAULTS["contrast"]
    saturation: float = _VIEW_DEFAULTS["saturation"]
    hue: float = _VIEW_DEFAULTS["hue"]
    grayscale_p: float = _VIEW_DEFAULTS["grayscale_p"]
    blur_p: float = _VIEW_DEFAULTS["blur_p"]
    blur_sigma: tuple[float, float] = _VIEW_DEFAULTS["blur_sigma"]
    blur_kernel_fraction: float = _VIEW_DEFAULTS["blur_kernel_fraction"]
    solarize_p: float = _VIEW_DEFAULTS["solarize_p"]
