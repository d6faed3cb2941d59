"""Self-supervised methods: one LightningModule per file, all subclasses of SSLMethod."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from sslpipe.methods.base import SSLMethod, SSLOutput
from sslpipe.methods.dae import DenoisingAutoencoder
from sslpipe.methods.mae import MaskedAutoencoder
from sslpipe.methods.masked import MaskedImageModel
from sslpipe.methods.moco import MoCo
from sslpipe.methods.pirl import PIRL
from sslpipe.methods.simclr import SimCLR
from sslpipe.methods.simmim import SimMIM

__all__ = [
    "DenoisingAutoencoder",
    "MaskedAutoencoder",
    "MaskedImageModel",
    "SimMIM",
    "SSLMethod",
    "SSLOutput",
    "MoCo",
    "SimCLR",
    "load_method",
    "PIRL",
]


def load_method(checkpoint_path: str, random_init: bool = False, map_location: Any = "cpu") -> SSLMethod:
    """Rebuild the method stored in ``checkpoint_path`` (any SSLMethod subclass).

    With ``random_init`` the same architecture is built from the stored hyper-parameters but the
    weights are left at their (seeded) initialisation: the random-init baseline for evaluation.
    """
    try:
        ckpt = torch.load(checkpoint_path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"checkpoint {checkpoint_path!r} not found; pass --checkpoint <run dir>/checkpoints/last.ckpt"
        ) from None
    path = ckpt.get("sslpipe_method") or ckpt.get("hyper_parameters", {}).get("_class_path")
    if path is None:
        raise ValueError(f"{checkpoint_path!r} was not written by an sslpipe method (no 'sslpipe_method' entry)")
    module_name, cls_name = path.rsplit(".", 1)
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        raise ValueError(
            f"{checkpoint_path!r} holds method {path!r}, which this version of sslpipe does not have"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, SSLMethod)):
        raise ValueError(f"{checkpoint_path!r} names {path!r}, which is not an SSLMethod")
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
    model = cls(**hparams)
    if not random_init:
        model.load_state_dict(ckpt["state_dict"])
    return model
