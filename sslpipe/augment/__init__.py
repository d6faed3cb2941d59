"""Augmentations shared by every method: view recipes, the SimCLR pipeline, multi-view wrapper, eval transform.

Each recipe runs per sample in the loader workers (``build``) or split into a uint8 geometric half in the
workers (``build_geometric``) and a photometric half batched on the device (``build_batched``).
"""

from sslpipe.augment.batched import BatchedAugment, BatchedPhotometric, BatchedViews
from sslpipe.augment.jigsaw import JigsawBatched, JigsawViews, jigsaw_permutations
from sslpipe.augment.mae import MAEViews
from sslpipe.augment.simclr import (
    MultiView,
    SimCLRAugment,
    SimCLRViews,
    ViewRecipe,
    eval_transform,
    geometric_transform,
    simclr_transform,
)

__all__ = [
    "BatchedAugment",
    "BatchedPhotometric",
    "BatchedViews",
    "JigsawBatched",
    "JigsawViews",
    "MAEViews",
    "MultiView",
    "SimCLRAugment",
    "SimCLRViews",
    "ViewRecipe",
    "eval_transform",
    "geometric_transform",
    "jigsaw_permutations",
    "simclr_transform",
]
