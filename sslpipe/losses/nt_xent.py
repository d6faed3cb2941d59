"""NT-Xent (normalised temperature-scaled cross entropy), the SimCLR loss.

Energy view: E(x, y) = -cos(z_x, z_y) / tau. Each view's positive is the other view of the
same image; its negatives are the 2N-2 other views of the *global* batch, whose energy the
loss pushes up through the softmax denominator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.distributed import gather_with_grad, rank, world_size


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True) -> torch.Tensor:
    """NT-Xent over the global batch of ``2 * N * world_size`` views.

    Args:
        z1, z2: ``(N, d)`` projections of the two views of the same N local images.
        temperature: softmax temperature tau (> 0).
        gather: under torch.distributed, take negatives from every rank (gradients flow back
            to their owners). ``False`` restricts negatives to the local batch.

    Returns:
        The mean loss over this rank's 2N anchors. With DDP's gradient averaging this is the
        gradient of the mean over the whole global batch. Always computed in fp32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must be (N, d) of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    # Similarities of unit vectors divided by a small tau overflow bf16/fp16's resolution: fp32 always.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        n = z1.shape[0]
        local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, d): view-1 rows then view-2 rows
        if gather:
            keys = gather_with_grad(local)  # (W*2N, d), rank r's block at [r*2N, (r+1)*2N)
            offset = rank() * 2 * n if world_size() > 1 else 0
        else:
            keys, offset = local, 0
        logits = local @ keys.T / temperature  # (2N, W*2N)
        idx = torch.arange(2 * n, device=z1.device)
        self_cols = offset + idx
        pos_cols = offset + (idx + n) % (2 * n)  # view-1 row i pairs with view-2 row i and back
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[idx, self_cols] = True
        logits = logits.masked_fill(self_mask, float("-inf"))  # a view is not its own negative
        return F.cross_entropy(logits, pos_cols)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent_loss` holding the temperature and gather flag."""

    def __init__(self, temperature: float = 0.1, gather: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather = gather

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Loss for the two views' projections ``z1``, ``z2`` of shape ``(N, d)``."""
        return nt_xent_loss(z1, z2, self.temperature, self.gather)
