"""Augmentations shared by every method: view recipes, the SimCLR pipeline, multi-view wrapper, eval transform."""

from sslpipe.augment.jigsaw import JigsawViews, jigsaw_permutations
from sslpipe.augment.mae import MAEViews
from sslpipe.augment.simclr import MultiView, SimCLRViews, ViewRecipe, eval_transform, simclr_transform

__all__ = [
    "MAEViews",
    "MultiView",
    "SimCLRViews",
    "ViewRecipe",
    "eval_transform",
    "simclr_transform",
    "JigsawViews",
    "jigsaw_permutations",
]
