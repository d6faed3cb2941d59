"""Augmentations shared by every method: view recipes, the SimCLR pipeline, multi-view wrapper, eval transform."""

from sslpipe.augment.simclr import MultiView, SimCLRViews, ViewRecipe, eval_transform, simclr_transform

__all__ = ["MultiView", "SimCLRViews", "ViewRecipe", "eval_transform", "simclr_transform"]
