"""A fixed sample of images for representation diagnostics: each image clean and as a positive pair of views.

Shared by the :class:`~sslpipe.callbacks.RepresentationDiagnostics` callback (during pretraining) and
``sslpipe report`` (after it), so both measure the same thing. The images are the labelled validation
split, or the pretraining images when the data has no labels (``unlabeled`` without ``eval_root``).

The positive pair of an image is two draws of the method's own training views when its recipe makes at
least two SimCLR views (SimCLR, MoCo v2/v3). Methods without such a pair (MAE, SimMIM, DAE: one crop;
PIRL: image + jigsaw tiles) get a *lightly perturbed twin* instead: two independent crops of 50-100% of
the image with mild brightness/contrast jitter (:data:`LIGHT_TWIN`). The views are drawn from a private,
seeded random stream, so every call yields the same views and the training's random stream is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from sslpipe.augment import SimCLRViews, ViewRecipe
from sslpipe.evaluation.features import feature_batches

# The positive pair of methods whose own views are not two SimCLR views.
LIGHT_TWIN = SimCLRViews(
    num_views=2,
    crop_scale=(0.5, 1.0),
    hflip_p=0.0,
    jitter_p=0.8,
    brightness=0.2,
    contrast=0.2,
    saturation=0.0,
    hue=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
)


def pair_recipe(views: Optional[ViewRecipe]) -> tuple[SimCLRViews, str]:
    """The view recipe whose first two views form a positive pair, and a phrase saying which one it is."""
    if isinstance(views, SimCLRViews) and views.num_views >= 2:
        return views, "two of the method's training views"
    return LIGHT_TWIN, "a lightly perturbed twin (crops of 50-100% area, brightness/contrast 0.2)"


@dataclass
class DiagnosticImages:
    """``indices`` of a split, read with the eval transform (``clean``) and with a positive-pair transform (``pairs``).

    Attributes:
        clean: dataset of ``(image, label)`` with the eval transform.
        pairs: the same images, items ``(views, label)`` whose first two views are a positive pair.
        indices: which images of the split, sorted.
        split: ``val``, or ``pretrain`` for unlabeled data.
        pair_source: how the positive pairs are made (for logs and reports).
        seed: seed of the private stream the views are drawn from.
    """

    clean: Dataset
    pairs: Dataset
    indices: list[int]
    split: str
    pair_source: str
    seed: int = 0

    @classmethod
    def from_datamodule(cls, datamodule: Any, num_images: int = 512, seed: int = 0) -> "DiagnosticImages":
        """``num_images`` images of an :class:`~sslpipe.data.SSLDataModule` (a seeded random subset of val, or of the
        pretraining images when there are no labels), with its own views as pairs where they are a pair."""
        if num_images < 2:
            raise ValueError(f"num_images must be >= 2 (uniformity and energies need pairs), got {num_images}")
        split = "val" if datamodule.num_classes > 0 else "pretrain"
        clean = datamodule.get_dataset(split, datamodule.eval_transform())
        recipe, source = pair_recipe(datamodule.views)
        pairs = datamodule.get_dataset(split, recipe.build(datamodule.image_size, datamodule.mean, datamodule.std))
        total = len(clean)  # type: ignore[arg-type]
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
        return cls(clean, pairs, sorted(order[:num_images].tolist()), split, source, seed)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(clean, view1, view2, labels)`` batches of the sample in order; the same views on every call."""
        generator_state = torch.Generator().manual_seed(self.seed).get_state()
        for start in range(0, len(self.indices), batch_size):
            chunk = self.indices[start : start + batch_size]
            # torchvision's random transforms draw from the global stream: fork it, continue our own stream.
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(generator_state)
                drawn = [self.pairs[i] for i in chunk]
                generator_state = torch.get_rng_state()
            clean = torch.stack([self.clean[i][0] for i in chunk])
            view1 = torch.stack([views[0] for views, _ in drawn])
            view2 = torch.stack([views[1] for views, _ in drawn])
            yield clean, view1, view2, torch.tensor([label for _, label in drawn], dtype=torch.long)


@torch.no_grad()
def embed_sample(
    model: nn.Module,
    images: DiagnosticImages,
    device: torch.device | str = "cpu",
    precision: str = "32-true",
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Features of ``model`` (eval mode, its ``forward``: the backbone features) on the sample: ``clean``, ``view1``,
    ``view2`` as fp32 ``(N, D)`` on the CPU, and ``labels`` ``(N,)``. One forward pass per batch for all three."""
    parts: dict[str, list[torch.Tensor]] = {"clean": [], "view1": [], "view2": [], "labels": []}

    def stacked() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for clean, view1, view2, labels in images.batches(batch_size):
            yield torch.cat([clean, view1, view2]), labels

    for features, labels in feature_batches(model, stacked(), device, precision):  # type: ignore[arg-type]
        for name, chunk in zip(("clean", "view1", "view2"), features.cpu().chunk(3)):
            parts[name].append(chunk)
        parts["labels"].append(labels)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}
