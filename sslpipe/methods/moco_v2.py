"""MoCo v2 (Chen, Fan, Girshick & He, 2020): queries against a momentum key encoder and a queue of past keys."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.batchnorm import BatchNormPolicy
from sslpipe.heads import mlp
from sslpipe.losses import DEFAULT_BLOCK, ContrastiveBlock, infonce_loss
from sslpipe.memory import MomentumQueue
from sslpipe.methods.base import SSLMethod, SSLOutput, check_method_sizes
from sslpipe.momentum import MomentumEncoder


class MoCoV2(SSLMethod):
    """MoCo v2: the query ``q(view 1)`` must pick out its key ``k(view 2)`` among the K queued keys of past batches.

    The key encoder (:class:`~sslpipe.momentum.MomentumEncoder` of backbone + projector) follows
    ``theta_k <- m * theta_k + (1 - m) * theta_q`` after every optimiser step; keys are L2-normalised,
    scored against the query, then written over the queue's oldest rows (all ranks' keys, so the queue is
    identical everywhere). BatchNorm handling (shuffle-BN, split-BN, SyncBN): :mod:`sslpipe.batchnorm`.

    Args:
        proj_hidden_dim, proj_output_dim, proj_num_layers: projector MLP (MoCo v2: 2048-128, 2 layers).
        proj_batch_norm: BatchNorm in the projector's hidden layers (MoCo v2: none; helps short runs).
        temperature: tau (MoCo v2: 0.2).
        queue_size: K (65536 for ImageNet; a few batches for small data sets).
        key_momentum: m (MoCo v2: 0.999), or its start with ``key_momentum_cosine``.
        key_momentum_cosine: raise m to 1 over training along a half cosine.
        symmetric: also score ``q(view 2)`` against ``k(view 1)`` and enqueue both views' keys (the official
            MoCo CIFAR demo's option): twice the compute per step, more signal per image seen.
        shuffle_bn: shuffle keys across ranks before the key encoder (MoCo's fix for BN leaking the positive).
        bn_splits: normalise over this many sub-batches per device (emulated devices; the single-device
            stand-in for shuffle-BN, as in the official MoCo CIFAR demo).
        sync_bn: SyncBatchNorm everywhere (excludes ``shuffle_bn``).
        contrastive_block: logits of the loss in row/column tiles of this size with a recomputing backward
            (memory O(N*d + block^2)); ``null``: the direct (N, M) matrix; ``auto``: by size.
        **kwargs: the shared :class:`SSLMethod` arguments (backbone, optimiser, schedule, probe).
    """

    label = "moco_v2"

    def __init__(
        self,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 128,
        proj_num_layers: int = 2,
        proj_batch_norm: bool = False,
        temperature: float = 0.2,
        queue_size: int = 65536,
        key_momentum: float = 0.999,
        key_momentum_cosine: bool = False,
        symmetric: bool = False,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
        sync_bn: bool = False,
        contrastive_block: ContrastiveBlock = DEFAULT_BLOCK,
        **kwargs: Any,
    ) -> None:
        check_method_sizes(
            temperature=temperature,
            proj_hidden_dim=proj_hidden_dim,
            proj_output_dim=proj_output_dim,
            proj_num_layers=proj_num_layers,
            queue_size=queue_size,
        )
        super().__init__(**kwargs)
        self.bn = BatchNormPolicy(bn_splits, shuffle_bn, sync_bn)
        self.temperature, self.contrastive_block, self.symmetric = temperature, contrastive_block, symmetric
        self.projector = mlp(self.feature_dim, proj_hidden_dim, proj_output_dim, proj_num_layers, proj_batch_norm)
        if sync_bn:
            self.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.backbone)
            self.projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.projector)
        self.key_encoder = MomentumEncoder(
            {"backbone": self.backbone, "projector": self.projector}, key_momentum, key_momentum_cosine
        )
        self.queue = MomentumQueue(queue_size, proj_output_dim)
        # Every rank enqueues the same gathered keys, so the queue stays identical without DDP re-sending
        # its K x d floats from rank 0 before every forward (broadcast_buffers).
        self.ignore_in_ddp("queue.queue", "queue.ptr", "key_encoder.num_updates")

    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 key-encoder projections of ``images`` (shuffle-/split-BN applied), no gradients."""
        return F.normalize(self.bn.keys(self.key_encoder, self.memory_format(images)).float(), dim=1)

    def query(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(backbone features, projections)`` of ``images``, every BatchNorm in ``bn_splits`` groups."""
        features = self.bn.split(self.encode, images)
        return features, self.bn.split(self.projector, features)

    def ssl_step(self, views: list[torch.Tensor], indices: Optional[torch.Tensor] = None) -> SSLOutput:
        """InfoNCE of ``q(view 1)`` against ``k(view 2)`` and the queue (+ the swapped pair when symmetric)."""
        x1, x2 = self.two_views(views)
        self.bn.check_batch(x1.shape[0])
        features, q = self.query(x1)
        k = self.keys(x2)
        # A copy: the enqueue below overwrites rows the loss's backward still needs.
        queue = self.queue.queue.clone()
        loss, logs = infonce_loss(q, k, queue, self.temperature, block=self.contrastive_block, return_stats=True)
        if self.symmetric:  # the official demo sums the two directions (no 1/2) and enqueues [k1, k2]
            k1 = self.keys(x1)
            loss = loss + infonce_loss(self.query(x2)[1], k1, queue, self.temperature, block=self.contrastive_block)
            k = torch.cat([k1, k])
        self.queue.enqueue(k)
        logs["key_momentum"] = self.key_encoder.momentum_at(self.global_step, self.total_steps)
        return SSLOutput(loss=loss, features=features, logs=logs)

    def on_fit_start(self) -> None:
        """Reject shuffle-BN when Lightning's ``trainer.sync_batchnorm`` already synchronises the statistics."""
        self.bn.validate_modules(self.key_encoder)
