"""MoCo v2 (Chen et al., 2020) and v3 (Chen, Xie & He, 2021): a momentum key encoder as the contrastive target."""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

from sslpipe.distributed import batch_shuffle, batch_unshuffle
from sslpipe.evaluation.diagnostics import contrastive_energies
from sslpipe.heads import mlp
from sslpipe.losses import infonce_logits, moco_v3_loss
from sslpipe.memory import MomentumQueue
from sslpipe.methods.base import SSLMethod, SSLOutput
from sslpipe.momentum import cosine_momentum, ema_update_, momentum_copy


class MoCo(SSLMethod):
    """MoCo: queries from the trained encoder must pick out their key, produced by a momentum encoder.

    The key encoder (a copy of backbone + projector, never optimised) follows
    ``theta_k <- m * theta_k + (1 - m) * theta_q`` after every optimiser step.

    * ``v2``: InfoNCE of query ``q(view 1)`` against key ``k(view 2)`` and a :class:`MomentumQueue`
      of the last K keys of all ranks; 2-layer MLP head without BatchNorm.
    * ``v3``: no queue; a predictor after the projector (both with BatchNorm, the projector's output
      BN affine-free); symmetric loss over the global batch of keys; works with timm ViTs.

    BatchNorm leaks "this key was computed with my query's batch" (the positive is the only
    current-batch key among v2's logits), which the model exploits to cheat. Remedies:

    * ``shuffle_bn``: the key batch is shuffled across ranks before the key encoder and un-shuffled
      after, so keys are normalised with a random subset's statistics (the MoCo papers' fix).
    * ``bn_splits`` (the single-device equivalent, as in the official MoCo CIFAR demo's split BN):
      each encoder normalises over ``bn_splits`` sub-batches of ``N / bn_splits`` images, emulating
      that many devices; with ``shuffle_bn`` the key sub-batches are drawn after a random permutation.
      With one process and ``bn_splits=1``, ``shuffle_bn`` is a documented no-op.
    * ``sync_bn``: convert all BatchNorm to SyncBatchNorm (MoCo v3's choice; it mainly matters for the
      heads' BN under DDP). It lives on the model, not ``trainer.sync_batchnorm``, so the choice is
      saved in the checkpoint's hyper-parameters and validated against ``shuffle_bn`` (they exclude
      each other: shuffling keys across ranks is pointless when statistics span all ranks).
      The trainer flag converts the same layers; it is detected and validated too.

    Args:
        mode: ``v2`` or ``v3``.
        proj_hidden_dim, proj_output_dim, proj_num_layers: projector MLP (v2: 2048/128/2, v3: 4096/256/3).
        proj_batch_norm: BatchNorm in the projector's hidden layers; ``None`` takes the paper's choice
            (v2: none, v3: yes, plus an affine-free BN on its output).
        pred_hidden_dim: v3 predictor hidden width (4096); the predictor maps ``proj_output_dim`` to itself.
        temperature: tau (v2: 0.2; v3: 0.2 for ViT, 1.0 for ResNet).
        queue_size: v2 queue length K (65536 for ImageNet).
        key_momentum: m, or its start ``m0`` when ``key_momentum_cosine`` (v2: 0.999; v3: 0.99 cosine to 1).
        key_momentum_cosine: raise m from ``key_momentum`` to 1 over training along a half cosine.
        shuffle_bn, bn_splits, sync_bn: BatchNorm handling, see above.
        freeze_patch_embed: keep a ViT's random patch projection fixed (MoCo v3's stability trick).
        **kwargs: the shared :class:`SSLMethod` arguments (backbone, optimiser, schedule, probe).
    """

    @classmethod
    def method_label(cls, hparams: dict[str, Any]) -> str:
        """``moco_v2`` or ``moco_v3``: the two modes are different methods in reports."""
        return f"moco_{hparams.get('mode', 'v2')}"

    def __init__(
        self,
        mode: Literal["v2", "v3"] = "v2",
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 128,
        proj_num_layers: int = 2,
        proj_batch_norm: Optional[bool] = None,
        pred_hidden_dim: int = 4096,
        temperature: float = 0.2,
        queue_size: int = 65536,
        key_momentum: float = 0.999,
        key_momentum_cosine: bool = False,
        shuffle_bn: bool = True,
        bn_splits: int = 1,
        sync_bn: bool = False,
        freeze_patch_embed: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mode not in ("v2", "v3"):
            raise ValueError(f"mode must be 'v2' or 'v3', got {mode!r}")
        if shuffle_bn and sync_bn:
            raise ValueError(
                "shuffle_bn and sync_bn exclude each other (synced statistics need no shuffling); set one to false"
            )
        if bn_splits < 1 or not 0.0 <= key_momentum <= 1.0:
            raise ValueError(f"need bn_splits >= 1 and 0 <= key_momentum <= 1, got {bn_splits} and {key_momentum}")
        self.mode, self.temperature, self.shuffle_bn, self.bn_splits = mode, temperature, shuffle_bn, bn_splits
        v3 = mode == "v3"
        hidden_bn = v3 if proj_batch_norm is None else proj_batch_norm
        self.projector = mlp(
            self.feature_dim, proj_hidden_dim, proj_output_dim, proj_num_layers, hidden_bn, last_batch_norm=v3
        )
        self.predictor = mlp(proj_output_dim, pred_hidden_dim, proj_output_dim, 2) if v3 else None
        self.queue = None if v3 else MomentumQueue(queue_size, proj_output_dim)
        if freeze_patch_embed:
            patch_embed = getattr(self.backbone, "patch_embed", None)
            if patch_embed is None:
                raise ValueError(
                    f"freeze_patch_embed needs a ViT backbone with patch_embed, {kwargs.get('backbone')!r} has none"
                )
            patch_embed.requires_grad_(False)
        if sync_bn:
            self.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(self.backbone)
            self.projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.projector)
            if self.predictor is not None:
                self.predictor = nn.SyncBatchNorm.convert_sync_batchnorm(self.predictor)
        self.key_backbone, self.key_projector = momentum_copy(self.backbone), momentum_copy(self.projector)
        # Optimiser steps folded into the key encoder so far (a checkpointed record; the momentum schedule
        # follows trainer.global_step).
        self.register_buffer("key_step", torch.zeros((), dtype=torch.long))
        # Every rank enqueues the same gathered keys, so the queue stays identical without DDP re-sending
        # its K x d floats from rank 0 before every forward (broadcast_buffers).
        self._ddp_params_and_buffers_to_ignore = ["queue.queue", "queue.ptr", "key_step"]

    # ------------------------------------------------------------------ encoders
    def _split_bn(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn`` over ``bn_splits`` sub-batches, so BatchNorm sees each alone (emulated devices)."""
        return fn(x) if self.bn_splits == 1 else torch.cat([fn(c) for c in x.chunk(self.bn_splits)])

    def _key_fn(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_projector(self.encode(x, self.key_backbone))

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 momentum-encoder projections of ``x`` (shuffle-BN when enabled), no gradients.

        Normalised here because v2 stores them in the queue, whose rows the loss takes as unit vectors.
        """
        if self.shuffle_bn:
            x, undo = batch_shuffle(x)
            k = batch_unshuffle(self._split_bn(self._key_fn, x), undo)
        else:
            k = self._split_bn(self._key_fn, x)
        return nn.functional.normalize(k.float(), dim=1)

    def current_key_momentum(self) -> float:
        """m for the next EMA update: constant, or the cosine schedule over ``trainer.estimated_stepping_batches``."""
        m0 = float(self.hparams.key_momentum)
        if not self.hparams.key_momentum_cosine or self._trainer is None:  # no trainer: no schedule to follow
            return m0
        total = float(self.trainer.estimated_stepping_batches)
        # global_step (a Python int, restored on resume) counts the optimiser steps taken before this update.
        return m0 if total == float("inf") else cosine_momentum(self.trainer.global_step, max(1, int(total)), m0)

    # ------------------------------------------------------------------ training
    def ssl_step(self, views: list[torch.Tensor], indices: Optional[torch.Tensor] = None) -> SSLOutput:
        """v2: InfoNCE against the queue, then enqueue the keys; v3: symmetric loss over the global batch."""
        if len(views) < 2:
            raise ValueError(f"MoCo needs 2 views per image, the data gave {len(views)}; use data.views: SimCLRViews")
        if views[0].shape[0] % self.bn_splits:
            raise ValueError(
                f"the batch of {views[0].shape[0]} images does not split into model.bn_splits={self.bn_splits} "
                "equal BatchNorm groups; choose a bn_splits that divides data.batch_size"
            )
        # Queries, like keys, pass every BatchNorm (backbone and heads) in bn_splits groups.
        features = self._split_bn(self.encode, views[0])
        if self.mode == "v2":
            q, k = self._split_bn(self.projector, features), self.keys(views[1])
            # A copy: the enqueue below overwrites rows the matmul's backward still needs.
            logits = infonce_logits(q, k, self.queue.queue.clone(), self.temperature)
            # infonce_loss(q, k, queue) written on the logits, which also give the pretext accuracy.
            loss = nn.functional.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
            self.queue.enqueue(k)
            logs = {"pretext_top1": (logits.argmax(1) == 0).float().mean()}
        else:

            def query(f: torch.Tensor) -> torch.Tensor:
                return self.predictor(self.projector(f))

            q1 = self._split_bn(query, features)
            q2 = self._split_bn(lambda x: query(self.encode(x)), views[1])
            k1, k2 = self.keys(views[0]), self.keys(views[1])
            loss = moco_v3_loss(q1, k2, self.temperature) + moco_v3_loss(q2, k1, self.temperature)
            q, k, logs = q1, k2, {}
        logs.update(contrastive_energies(q.detach(), k), key_momentum=self.current_key_momentum())
        return SSLOutput(loss=loss, features=features, logs=logs)

    def on_fit_start(self) -> None:
        """Reject shuffle-BN when Lightning's ``trainer.sync_batchnorm`` already synchronises the statistics."""
        if self.shuffle_bn and any(isinstance(m, nn.SyncBatchNorm) for m in self.key_backbone.modules()):
            raise ValueError(
                "trainer.sync_batchnorm=true with model.shuffle_bn=true: "
                "use one (model.sync_bn replaces the trainer flag)"
            )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimiser, then EMA-update the key encoder (once per real step, also with accumulation).

        Inside the optimiser step, not in a batch-end hook: checkpoint callbacks run at batch end before
        the module's hook, and a checkpoint taken there must already hold this step's key encoder.
        Caveats: with ``16-mixed`` a step that the gradient scaler skips still moves the key encoder
        (towards unchanged weights), and strategies that accumulate gradients themselves (DeepSpeed)
        call this hook per micro-batch.
        """
        super().optimizer_step(*args, **kwargs)
        m = self.current_key_momentum()
        ema_update_(self.key_backbone, self.backbone, m)
        ema_update_(self.key_projector, self.projector, m)
        self.key_step += 1
