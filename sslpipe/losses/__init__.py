"""Loss functions: pure functions of tensors, one idea per module."""

from sslpipe.losses.nt_xent import NTXentLoss, nt_xent_loss

__all__ = ["NTXentLoss", "nt_xent_loss"]
