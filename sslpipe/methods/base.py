"""SSLMethod: what every self-supervised method shares, written once.

A method subclasses :class:`SSLMethod` and implements :meth:`SSLMethod.ssl_step`, which turns a
batch of training views into a loss (and the backbone features the online probe should see).
Everything else lives here: backbone construction, the online linear probe, optimiser and
warm-up/cosine schedule (SGD, AdamW, LARS with bias/norm exclusion), logging, and the class path
stored in checkpoints so evaluation can rebuild any method from a checkpoint file alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.backbones import build_backbone
from sslpipe.optim import OptimizerName, build_optimizer, param_groups, warmup_cosine


@dataclass
class SSLOutput:
    """What :meth:`SSLMethod.ssl_step` returns.

    Attributes:
        loss: the self-supervised loss to minimise (scalar).
        features: backbone features ``(B, feature_dim)`` of one plain (unmasked) view, for the online
            probe; the base class detaches them. ``None`` skips the probe's training step.
        logs: extra scalars to log under ``train/`` (energies, accuracies of the pretext task, ...).
    """

    loss: torch.Tensor
    features: Optional[torch.Tensor] = None
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class SSLMethod(pl.LightningModule):
    """Base LightningModule: backbone, online probe, optimiser/schedule and logging.

    Args:
        backbone: timm name (``resnet18``, ``vit_tiny_patch16_224``, ...) or ``torchvision/<name>``.
        cifar_stem: 3x3 stride-1 stem without max-pool for small (32-px) images (ResNets).
        backbone_kwargs: extra constructor arguments, e.g. ``{patch_size: 4, global_pool: avg}``.
        image_size: input side; linked from ``data.image_size`` by the CLI (ViT position embeddings).
        num_classes: label count for the online probe; linked from the data by the CLI. 0 (the pretraining
            images have no labels): no probe.
        optimizer: ``lars``, ``sgd`` or ``adamw``.
        base_lr: learning rate for a global batch of ``lr_reference_batch``; the optimiser uses
            ``base_lr * global_batch / lr_reference_batch`` (the linear scaling rule).
        lr_reference_batch: the batch size ``base_lr`` refers to (256 in most papers).
        weight_decay: decoupled (AdamW) or L2 (SGD/LARS) weight decay.
        momentum: SGD/LARS momentum.
        betas: AdamW betas.
        warmup_epochs: linear warm-up length (fractions allowed).
        min_lr_ratio: the cosine schedule ends at ``min_lr_ratio * lr``.
        exclude_bias_norm: no weight decay and no LARS adaptation for biases, norm weights, tokens.
        online_probe: train a linear classifier on detached features during pretraining.
        probe_lr: the probe's learning rate (its own group: no weight decay, no LARS, not scaled).
        channels_last: run the backbone in channels-last memory format (faster convolutions on
            CPUs with bf16 units and on tensor-core GPUs).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        cifar_stem: bool = False,
        backbone_kwargs: Optional[dict[str, Any]] = None,
        image_size: int = 32,
        num_classes: int = 10,
        optimizer: OptimizerName = "lars",
        base_lr: float = 0.3,
        lr_reference_batch: int = 256,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 10.0,
        min_lr_ratio: float = 0.0,
        exclude_bias_norm: bool = True,
        online_probe: bool = True,
        probe_lr: float = 0.1,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone, self.feature_dim = build_backbone(
            backbone, cifar_stem=cifar_stem, image_size=image_size, **(backbone_kwargs or {})
        )
        self.channels_last = channels_last
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.probe = nn.Linear(self.feature_dim, num_classes) if online_probe and num_classes > 0 else None

    @classmethod
    def method_label(cls, hparams: dict[str, Any]) -> str:
        """The name runs, metrics and reports use for this method with these hyper-parameters."""
        return cls.__name__.lower()

    # ------------------------------------------------------------------ what subclasses use
    def encode(self, images: torch.Tensor, backbone: Optional[nn.Module] = None) -> torch.Tensor:
        """Features ``(B, feature_dim)`` of a batch of images from ``backbone`` (default: the trained one)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return (self.backbone if backbone is None else backbone)(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features used by evaluation (linear probe, kNN); subclasses may choose another pooling."""
        return self.encode(images)

    def ssl_step(self, views: Any, indices: torch.Tensor) -> SSLOutput:
        """Compute the self-supervised loss for one batch of training views.

        Args:
            views: what the data's view recipe produced, collated: usually a list of ``(B, 3, S, S)``.
            indices: ``(B,)`` dataset indices of the images (for per-sample memory).
        """
        raise NotImplementedError

    @property
    def global_batch_size(self) -> int:
        """Images per optimiser step over all devices (per-device batch x devices x accumulation)."""
        trainer = self.trainer
        per_device = (
            trainer.datamodule.batch_size if trainer.datamodule is not None else trainer.train_dataloader.batch_size
        )
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: tuple[Any, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Self-supervised loss plus the online probe's loss on detached features."""
        views, labels, indices = batch
        out = self.ssl_step(views, indices)
        batch_size = labels.shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch_size)
        for name, value in out.logs.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        loss = out.loss
        if self.probe is not None and out.features is not None:
            logits = self.probe(out.features.detach().float())
            # STL-10's unlabeled images carry label -1: the probe skips them.
            probe_loss = F.cross_entropy(logits, labels, ignore_index=-1)
            if torch.isfinite(probe_loss):
                loss = loss + probe_loss
                self.log("train/online_probe_loss", probe_loss, batch_size=batch_size)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Online probe top-1 on the validation split (the number solo-learn reports during training)."""
        if self.probe is None:
            return
        images, labels = batch
        logits = self.probe(self(images).float())
        top1 = (logits.argmax(1) == labels).float().mean()
        self.log("val/online_linear_top1", top1, prog_bar=True, sync_dist=True, batch_size=labels.shape[0])

    def configure_optimizers(self) -> Any:
        """Optimiser over all trainable parameters (momentum encoders have ``requires_grad=False``)."""
        hp = self.hparams
        lr = hp.base_lr * self.global_batch_size / hp.lr_reference_batch
        groups = param_groups(self, hp.weight_decay, hp.exclude_bias_norm, prefix_excluded=("probe.",))
        if self.probe is not None:
            groups.append(
                {"params": list(self.probe.parameters()), "weight_decay": 0.0, "lars_exclude": True, "lr": hp.probe_lr}
            )
        optimizer = build_optimizer(hp.optimizer, groups, lr=lr, momentum=hp.momentum, betas=tuple(hp.betas))
        estimated = self.trainer.estimated_stepping_batches
        if not math.isfinite(estimated):
            raise ValueError(
                "the warm-up + cosine schedule needs a finite run: set trainer.max_epochs or trainer.max_steps"
            )
        total = max(1, int(estimated))
        # Steps per epoch from the loader, not total / max_epochs: max_steps may end training first.
        if self.trainer.train_dataloader is None:
            self.trainer.fit_loop.setup_data()
        batches = self.trainer.num_training_batches
        steps_per_epoch = (
            math.ceil(batches / self.trainer.accumulate_grad_batches)
            if math.isfinite(batches)
            else total / max(1, self.trainer.max_epochs or 1)
        )
        warmup = int(hp.warmup_epochs * steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """Give each rank, and each resumed run, its own random stream (masks, noise, sampled negatives).

        ``seed_everything`` seeds every rank alike, so rank r would draw the same MAE mask or PIRL
        negatives for its i-th image as every other rank, and the global batch would see W times fewer
        distinct draws; a resumed run would replay the first run's draws. The stream is re-derived from
        the global seed, the rank and the step (here, after Lightning has restored ``global_step``).
        A fresh single-process run keeps the global seed. Weights stay identical: DDP broadcasts rank 0's.
        """
        base = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything; unseeded ranks already differ
        rank, step = self.global_rank, self.trainer.global_step
        if base is not None and (rank or step):
            torch.manual_seed((int(base) + 1_000_003 * rank + 7_919 * step) % 2**63)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the class so :func:`sslpipe.methods.load_method` can rebuild it from the file alone."""
        checkpoint["sslpipe_method"] = f"{type(self).__module__}.{type(self).__qualname__}"
