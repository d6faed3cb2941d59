"""SimCLR (Chen et al., 2020): two augmented views, a projection MLP, NT-Xent over the global batch."""

from __future__ import annotations

from typing import Any, Optional

import torch

from sslpipe.heads import mlp
from sslpipe.losses import DEFAULT_BLOCK, ContrastiveBlock, nt_xent_loss
from sslpipe.methods.base import SSLMethod, SSLOutput, check_method_sizes


class SimCLR(SSLMethod):
    """SimCLR: pull the two views of an image together, push the other 2N-2 global-batch views away.

    Args:
        proj_hidden_dim: hidden width of the projection MLP (SimCLR: 2048).
        proj_output_dim: output width of the projection MLP (SimCLR: 128).
        proj_num_layers: Linear layers in the projection MLP (SimCLR v1: 2, v2: 3).
        temperature: NT-Xent temperature (0.1 for large ImageNet batches, 0.2-0.5 for CIFAR).
        gather_negatives: under DDP take negatives from every rank (SimCLR's global batch).
        contrastive_block: logits of the loss in row/column tiles of this size with a recomputing backward
            (memory O(N*d + block^2)); ``null``: the direct (N, M) matrix; ``auto``: by size.
        **kwargs: the shared :class:`SSLMethod` arguments (backbone, optimiser, schedule, probe).
    """

    def __init__(
        self,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 128,
        proj_num_layers: int = 2,
        temperature: float = 0.1,
        gather_negatives: bool = True,
        contrastive_block: ContrastiveBlock = DEFAULT_BLOCK,
        **kwargs: Any,
    ) -> None:
        check_method_sizes(
            temperature=temperature,
            proj_hidden_dim=proj_hidden_dim,
            proj_output_dim=proj_output_dim,
            proj_num_layers=proj_num_layers,
        )
        super().__init__(**kwargs)
        self.projector = mlp(self.feature_dim, proj_hidden_dim, proj_output_dim, proj_num_layers)
        self.temperature = temperature
        self.gather_negatives = gather_negatives
        self.contrastive_block = contrastive_block

    def ssl_step(self, views: list[torch.Tensor], indices: Optional[torch.Tensor] = None) -> SSLOutput:
        """NT-Xent between the projections of the first two views."""
        x1, x2 = self.two_views(views)
        n = x1.shape[0]
        # One backbone pass over both views: half the kernel launches, and BN sees 2N images as in the paper.
        features = self.encode(torch.cat([x1, x2]))
        z = self.projector(features)
        z1, z2 = z[:n], z[n:]
        loss, logs = nt_xent_loss(
            z1, z2, self.temperature, self.gather_negatives, block=self.contrastive_block, return_stats=True
        )
        return SSLOutput(loss=loss, features=features[:n], logs=logs)
