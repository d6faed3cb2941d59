"""Self-supervised methods: one LightningModule per file, all subclasses of SSLMethod."""

from __future__ import annotations

from sslpipe.checkpoints import load_method
from sslpipe.methods.base import SSLMethod, SSLOutput
from sslpipe.methods.dae import DenoisingAutoencoder
from sslpipe.methods.mae import MaskedAutoencoder
from sslpipe.methods.moco_v2 import MoCoV2
from sslpipe.methods.moco_v3 import MoCoV3
from sslpipe.methods.pirl import PIRL
from sslpipe.methods.simclr import SimCLR
from sslpipe.methods.simmim import SimMIM

__all__ = [
    "DenoisingAutoencoder",
    "MaskedAutoencoder",
    "MoCoV2",
    "MoCoV3",
    "PIRL",
    "SSLMethod",
    "SSLOutput",
    "SimCLR",
    "SimMIM",
    "load_method",
]
