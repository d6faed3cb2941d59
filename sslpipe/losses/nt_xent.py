"""NT-Xent (normalised temperature-scaled cross entropy), the SimCLR loss.

Energy view: E(x, y) = -cos(z_x, z_y) / tau. Each view's positive is the other view of the
same image; its negatives are the 2N-2 other views of the *global* batch, whose energy the
loss pushes up through the softmax denominator.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from sslpipe.distributed import gather_with_grad, rank, world_size
from sslpipe.losses.contrastive import ContrastiveBlock, check_pair, contrastive_row_losses


def nt_xent_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    gather: bool = True,
    block: ContrastiveBlock = None,
    return_stats: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """NT-Xent over the global batch of ``2 * N * world_size`` views.

    Args:
        z1, z2: ``(N, d)`` projections of the two views of the same N local images.
        temperature: softmax temperature tau (> 0).
        gather: under torch.distributed, take negatives from every rank (gradients flow back
            to their owners). ``False`` restricts negatives to the local batch.
        block: ``None`` materialises the ``(2N, W*2N)`` logits; an int tiles them (memory O(block^2));
            ``"auto"`` chooses by size (see :mod:`sslpipe.losses.contrastive`).
        return_stats: also return the energies and pretext top-1 of this rank's 2N anchors.

    Returns:
        The mean loss over this rank's 2N anchors (and the stats dict when asked). With DDP's gradient
        averaging this is the gradient of the mean over the whole global batch. Always computed in fp32.
    """
    check_pair(z1, z2, "z1 and z2")
    n = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, d): view-1 rows then view-2 rows
        if gather:
            keys = gather_with_grad(local)  # (W*2N, d), rank r's block at [r*2N, (r+1)*2N)
            offset = rank() * 2 * n if world_size() > 1 else 0
        else:
            keys, offset = local, 0
        rows = torch.arange(2 * n, device=z1.device)
        out = contrastive_row_losses(
            local,
            keys,
            temperature,
            pos_col=offset + (rows + n) % (2 * n),  # view-1 row i pairs with view-2 row i and back
            exclude_col=offset + rows,  # a view is not its own negative
            block=block,
            return_stats=return_stats,
        )
    return (out[0].mean(), out[1]) if return_stats else out.mean()
