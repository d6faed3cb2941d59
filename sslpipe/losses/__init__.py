"""Loss functions: pure functions of tensors, one idea per module.

Every contrastive loss (NT-Xent, MoCo's InfoNCE forms, PIRL's NCE and InfoNCE) is a thin layer over the
one core in :mod:`sslpipe.losses.contrastive` (direct or tiled logits, chosen by ``block``).
"""

from sslpipe.losses.contrastive import (
    AUTO_BLOCK,
    AUTO_DIRECT_MAX_ENTRIES,
    DEFAULT_BLOCK,
    ContrastiveBlock,
    contrastive_row_losses,
    resolve_block,
)
from sslpipe.losses.infonce import batch_infonce_loss, infonce_loss
from sslpipe.losses.nt_xent import nt_xent_loss
from sslpipe.losses.pirl import PIRLLoss, estimate_nce_log_z, pirl_infonce_loss, pirl_nce_loss
from sslpipe.losses.reconstruction import masked_l1_loss, masked_mse_loss

__all__ = [
    "AUTO_BLOCK",
    "AUTO_DIRECT_MAX_ENTRIES",
    "DEFAULT_BLOCK",
    "ContrastiveBlock",
    "contrastive_row_losses",
    "resolve_block",
    "batch_infonce_loss",
    "infonce_loss",
    "nt_xent_loss",
    "PIRLLoss",
    "estimate_nce_log_z",
    "pirl_infonce_loss",
    "pirl_nce_loss",
    "masked_l1_loss",
    "masked_mse_loss",
]
