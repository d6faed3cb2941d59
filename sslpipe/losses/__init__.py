"""Loss functions: pure functions of tensors, one idea per module."""

from sslpipe.losses.infonce import InfoNCELoss, infonce_logits, infonce_loss, moco_v3_loss
from sslpipe.losses.nt_xent import NTXentLoss, nt_xent_loss
from sslpipe.losses.pirl import PIRLLoss, estimate_nce_log_z, pirl_infonce_loss, pirl_nce_loss
from sslpipe.losses.reconstruction import MaskedReconstructionLoss, masked_l1_loss, masked_mse_loss

__all__ = [
    "InfoNCELoss",
    "infonce_logits",
    "infonce_loss",
    "moco_v3_loss",
    "MaskedReconstructionLoss",
    "masked_l1_loss",
    "masked_mse_loss",
    "NTXentLoss",
    "nt_xent_loss",
    "PIRLLoss",
    "estimate_nce_log_z",
    "pirl_infonce_loss",
    "pirl_nce_loss",
]
