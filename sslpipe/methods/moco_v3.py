"""MoCo v3 (Chen, Xie & He, 2021): a predictor on the queries, momentum keys of the global batch, no queue."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.batchnorm import BatchNormPolicy
from sslpipe.heads import mlp
from sslpipe.losses import DEFAULT_BLOCK, ContrastiveBlock, batch_infonce_loss
from sslpipe.methods.base import SSLMethod, SSLOutput, check_method_sizes
from sslpipe.momentum import MomentumEncoder


class MoCoV3(SSLMethod):
    """MoCo v3: each view's prediction must pick out the other view's momentum key among the global batch's keys.

    ``loss = 2 tau * [CE(q1 . k2_all / tau) + CE(q2 . k1_all / tau)]`` with ``q = predictor(projector(backbone))``
    and ``k`` from the :class:`~sslpipe.momentum.MomentumEncoder` of backbone + projector, whose momentum
    rises from ``key_momentum`` to 1 along a half cosine. Works with ResNets and timm ViTs.

    Args:
        proj_hidden_dim, proj_output_dim, proj_num_layers: projector MLP (MoCo v3: 4096-256, 3 layers, BatchNorm
            in the hidden layers and an affine-free BatchNorm on the output).
        pred_hidden_dim: predictor hidden width (4096); the predictor maps ``proj_output_dim`` to itself.
        temperature: tau (MoCo v3: 1.0 for ResNets, 0.2 for ViTs).
        key_momentum: m0 of the cosine schedule (MoCo v3: 0.99).
        key_momentum_cosine: the cosine schedule to 1 (MoCo v3: on).
        shuffle_bn, bn_splits, sync_bn: BatchNorm handling (:mod:`sslpipe.batchnorm`; MoCo v3 uses SyncBN).
        freeze_patch_embed: keep a ViT's random patch projection fixed (MoCo v3's stability trick).
        contrastive_block: logits of the loss in row/column tiles of this size with a recomputing backward
            (memory O(N*d + block^2)); ``null``: the direct (N, M) matrix; ``auto``: by size.
        **kwargs: the shared :class:`SSLMethod` arguments (backbone, optimiser, schedule, probe).
    """

    label = "moco_v3"

    def __init__(
        self,
        proj_hidden_dim: int = 4096,
        proj_output_dim: int = 256,
        proj_num_layers: int = 3,
        pred_hidden_dim: int = 4096,
        temperature: float = 1.0,
        key_momentum: float = 0.99,
        key_momentum_cosine: bool = True,
        shuffle_bn: bool = False,
        bn_splits: int = 1,
        sync_bn: bool = False,
        freeze_patch_embed: bool = False,
        contrastive_block: ContrastiveBlock = DEFAULT_BLOCK,
        **kwargs: Any,
    ) -> None:
        check_method_sizes(
            temperature=temperature,
            proj_hidden_dim=proj_hidden_dim,
            proj_output_dim=proj_output_dim,
            proj_num_layers=proj_num_layers,
            pred_hidden_dim=pred_hidden_dim,
        )
        super().__init__(**kwargs)
        self.bn = BatchNormPolicy(bn_splits, shuffle_bn, sync_bn)
        self.temperature, self.contrastive_block = temperature, contrastive_block
        self.projector = mlp(
            self.feature_dim, proj_hidden_dim, proj_output_dim, proj_num_layers, batch_norm=True, last_batch_norm=True
        )
        self.predictor = mlp(proj_output_dim, pred_hidden_dim, proj_output_dim, 2)
        if freeze_patch_embed:
            patch_embed = getattr(self.backbone, "patch_embed", None)
            if patch_embed is None:
                raise ValueError(
                    f"freeze_patch_embed needs a ViT backbone with patch_embed; {kwargs.get('backbone')!r} has none"
                )
            patch_embed.requires_grad_(False)
        if sync_bn:
            self.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.backbone)
            self.projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.projector)
            self.predictor = nn.SyncBatchNorm.convert_sync_batchnorm(self.predictor)
        self.key_encoder = MomentumEncoder(
            {"backbone": self.backbone, "projector": self.projector}, key_momentum, key_momentum_cosine
        )
        self.ignore_in_ddp("key_encoder.num_updates")

    def query(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(backbone features, predictions)`` of ``images``, every BatchNorm in ``bn_splits`` groups."""
        features = self.bn.split(self.encode, images)
        return features, self.bn.split(lambda f: self.predictor(self.projector(f)), features)

    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 key-encoder projections of ``images``, no gradients."""
        return F.normalize(self.bn.keys(self.key_encoder, self.memory_format(images)).float(), dim=1)

    def ssl_step(self, views: list[torch.Tensor], indices: Optional[torch.Tensor] = None) -> SSLOutput:
        """Symmetric InfoNCE of each view's prediction against the other view's keys over the global batch."""
        x1, x2 = self.two_views(views)
        self.bn.check_batch(x1.shape[0])
        (features, q1), (_, q2) = self.query(x1), self.query(x2)
        k1, k2 = self.keys(x1), self.keys(x2)
        tau, block = self.temperature, self.contrastive_block
        first, logs = batch_infonce_loss(q1, k2, tau, block=block, return_stats=True)
        # The paper's 2 tau factor makes the gradient's scale independent of tau.
        loss = 2 * tau * (first + batch_infonce_loss(q2, k1, tau, block=block))
        logs["key_momentum"] = self.key_encoder.momentum_at(self.global_step, self.total_steps)
        return SSLOutput(loss=loss, features=features, logs=logs)

    def on_fit_start(self) -> None:
        """Reject shuffle-BN when Lightning's ``trainer.sync_batchnorm`` already synchronises the statistics."""
        self.bn.validate_modules(self.key_encoder)
