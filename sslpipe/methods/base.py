"""SSLMethod: what every self-supervised method shares, written once.

A method subclasses :class:`SSLMethod` and implements :meth:`SSLMethod.ssl_step`, which turns a
batch of training views into a loss (and the backbone features the online probe should see).
Everything else lives here: backbone construction, the online probe component, optimiser and
warm-up/cosine schedule (SGD, AdamW, LARS with bias/norm exclusion), the EMA update of any
:class:`~sslpipe.momentum.MomentumEncoder` the method holds, logging, and the class path stored in
checkpoints so evaluation can rebuild any method from a checkpoint file alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, get_args

import pytorch_lightning as pl
import torch
from torch import nn

from sslpipe.backbones import build_backbone
from sslpipe.errors import check_choice, check_positive
from sslpipe.momentum import MomentumEncoder
from sslpipe.optim import OptimizerName, build_optimizer, param_groups, warmup_cosine
from sslpipe.probe import OnlineProbe
from sslpipe.resume import collect_rng_states, set_rng_states


def check_method_sizes(**values: float) -> None:
    """Raise :class:`~sslpipe.errors.ConfigError` naming ``model.<key>`` for any value that is not > 0
    (temperatures, head widths and depths, queue sizes): called first in each method's constructor, so a bad
    config stops when it is read, before a backbone is built or data touched."""
    for key, value in values.items():
        check_positive(f"model.{key}", value)


@dataclass
class SSLOutput:
    """What :meth:`SSLMethod.ssl_step` returns.

    Attributes:
        loss: the self-supervised loss to minimise (scalar).
        features: backbone features ``(B, feature_dim)`` of one plain (unmasked) view, for the online
            probe (which detaches them). ``None`` skips the probe's training step.
        logs: extra scalars to log under ``train/`` (energies, accuracies of the pretext task, ...).
    """

    loss: torch.Tensor
    features: Optional[torch.Tensor] = None
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


class SSLMethod(pl.LightningModule):
    """Base LightningModule: backbone, online probe, optimiser/schedule, momentum encoders and logging.

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
        online_probe: train a linear classifier on detached features during pretraining
            (:class:`~sslpipe.probe.OnlineProbe`, its own SGD optimiser and cosine schedule).
        probe_lr: the probe's peak learning rate.
        probe_batch_norm: affine-free BatchNorm before the probe's linear layer (MAE's recipe).
        channels_last: run the backbone in channels-last memory format (faster convolutions on
            CPUs with bf16 units and on tensor-core GPUs).
        compile: ``torch.compile`` the backbone, the heads and the momentum encoders' copies in place
            (:meth:`compile_targets`) when training starts; checkpoint keys stay the same, so compiled and
            eager runs resume from each other's checkpoints. The first steps pay the compilation.
        compile_kwargs: arguments of ``torch.compile``, e.g. ``{mode: max-autotune}`` or ``{backend: eager}``.
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
        probe_batch_norm: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        compile_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        check_positive("model.image_size", image_size, "it is linked from data.image_size")
        check_positive("model.base_lr", base_lr)
        check_positive("model.lr_reference_batch", lr_reference_batch)
        check_choice("model.optimizer", optimizer, get_args(OptimizerName))
        self.save_hyperparameters()
        self.backbone, self.feature_dim = build_backbone(
            backbone, cifar_stem=cifar_stem, image_size=image_size, **(backbone_kwargs or {})
        )
        self.channels_last = channels_last
        self._compiled = False
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.probe: Optional[OnlineProbe] = None
        if online_probe and num_classes > 0:
            self.probe = OnlineProbe(self.feature_dim, num_classes, lr=probe_lr, batch_norm=probe_batch_norm)
            # The probe all-reduces its own gradients (it is not part of the loss DDP differentiates).
            self._ddp_params_and_buffers_to_ignore = [f"probe.{n}" for n, _ in self.probe.named_parameters()]

    #: The name runs, metrics and reports use (and the folder under configs/); default: the class name, lower case.
    label: ClassVar[str] = ""
    #: What a non-finite loss does: ``stop`` (checked off the step by :class:`~sslpipe.callbacks.NonFiniteGuard`)
    #: or ``skip`` the step's update; set from ``run.on_nan`` by the guard.
    on_nan: str = "stop"
    skipped_steps: int = 0
    _restored_rng: Optional[dict[str, Any]] = None

    @classmethod
    def method_label(cls) -> str:
        """The name runs, metrics and reports use for this method."""
        return cls.label or cls.__name__.lower()

    def ignore_in_ddp(self, *names: str) -> None:
        """Keep parameters/buffers out of DDP's gradient reduction and buffer broadcast (state every rank
        updates identically on its own, such as queues and memory banks)."""
        self._ddp_params_and_buffers_to_ignore = [*getattr(self, "_ddp_params_and_buffers_to_ignore", []), *names]

    # ------------------------------------------------------------------ what subclasses use
    def memory_format(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in the backbone's memory format (channels-last when configured)."""
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features ``(B, feature_dim)`` of a batch of images."""
        return self.backbone(self.memory_format(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features used by evaluation (linear probe, kNN); subclasses may choose another pooling."""
        return self.encode(images)

    def two_views(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The first two views of a multi-view batch, with a clear error when the data gave fewer."""
        if len(views) < 2:
            raise ValueError(
                f"{type(self).__name__} needs 2 views per image, the data gave {len(views)}; "
                "use data.views: sslpipe.augment.SimCLRViews"
            )
        return views[0], views[1]

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
        dm = trainer.datamodule
        per_device = dm.batch_size if dm is not None else trainer.train_dataloader.batch_size
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    @property
    def total_steps(self) -> float:
        """Optimiser steps of the whole run (``inf`` outside a trainer or for an unbounded run)."""
        return float(self.trainer.estimated_stepping_batches) if self._trainer is not None else float("inf")

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: tuple[Any, torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The self-supervised loss (returned for Lightning's backward) and one online-probe step."""
        views, labels, indices = batch
        skip = self.on_nan == "skip"
        # run.on_nan skip: BatchNorm statistics are saved before the forward (a non-finite batch would poison
        # them), the loss is inspected before backward (a host sync, paid only in this mode), and returning None
        # makes Lightning skip backward and the optimiser update of this step.
        norm_stats = [(b, b.clone()) for b in self._norm_statistics()] if skip else []
        out = self.ssl_step(views, indices)
        batch_size = labels.shape[0]
        if skip and not bool(torch.isfinite(out.loss.detach())):
            for buffer, saved in norm_stats:
                buffer.copy_(saved)
            self.skipped_steps += 1
            return None  # type: ignore[return-value]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch_size)
        for name, value in out.logs.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        if self.probe is not None and out.features is not None:
            total = self.total_steps
            total = int(total) if math.isfinite(total) else self.trainer.global_step + 1
            probe_loss = self.probe.training_step(out.features, labels, self.trainer.global_step, total)
            self.log("train/online_probe_loss", probe_loss, batch_size=batch_size)
        return out.loss

    def _norm_statistics(self) -> list[torch.Tensor]:
        """Running mean/var buffers of every BatchNorm (what a forward pass in training mode updates)."""
        stats = []
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
                stats += [module.running_mean, module.running_var]
        return stats

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Online probe top-1 on the validation split (the number solo-learn reports during training)."""
        if self.probe is None:
            return
        images, labels = batch
        top1 = (self.probe(self(images)).argmax(1) == labels).float().mean()
        self.log("val/online_linear_top1", top1, prog_bar=True, sync_dist=True, batch_size=labels.shape[0])

    def configure_optimizers(self) -> Any:
        """Optimiser over the trainable parameters but the probe's (momentum encoders have ``requires_grad=False``)."""
        hp = self.hparams
        lr = hp.base_lr * self.global_batch_size / hp.lr_reference_batch
        groups = param_groups(self, hp.weight_decay, hp.exclude_bias_norm, prefix_excluded=("probe.",))
        optimizer = build_optimizer(hp.optimizer, groups, lr=lr, momentum=hp.momentum, betas=tuple(hp.betas))
        total = self.total_steps  # public API; it loads the train loader when epochs bound the run
        if not math.isfinite(total):
            raise ValueError(
                "the warm-up + cosine schedule needs a finite run: set trainer.max_epochs or trainer.max_steps"
            )
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):  # a max_steps-only run: the loader was not needed to count steps
            batches = len(self.trainer.datamodule.train_dataloader()) // self.trainer.world_size
        # Steps per epoch from the loader, not total / max_epochs: max_steps may end training first.
        steps_per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
        warmup = int(hp.warmup_epochs * steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, int(total), hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimiser, then EMA-update every momentum encoder (once per real step, also with accumulation).

        Inside the optimiser step, not in a batch-end hook: checkpoint callbacks run at batch end before
        the module's hook, and a checkpoint taken there must already hold this step's target network.
        Caveats: with ``16-mixed`` a step that the gradient scaler skips still moves the targets (towards
        unchanged weights), and strategies that accumulate gradients themselves (DeepSpeed) call this
        hook per micro-batch.
        """
        super().optimizer_step(*args, **kwargs)
        for encoder in self.momentum_encoders():
            # global_step (a Python int, restored on resume) counts the optimiser steps before this update.
            encoder.update(self.trainer.global_step, self.total_steps)

    def momentum_encoders(self) -> list[MomentumEncoder]:
        """The :class:`MomentumEncoder` submodules, updated after every optimiser step."""
        return [m for m in self.modules() if isinstance(m, MomentumEncoder)]

    def compile_targets(self) -> list[nn.Module]:
        """The modules ``model.compile`` compiles: every child with parameters (backbone, heads), the copies inside
        each :class:`MomentumEncoder`, and the ``blocks`` stack of any of them (the masked models call a ViT's
        blocks directly, not its ``forward``). Not the online probe (a tiny step with its own autograd call) nor
        parameter-free children (queue, memory bank, loss modules)."""
        targets: list[nn.Module] = []
        for name, child in self.named_children():
            if name == "probe" or next(child.parameters(), None) is None:
                continue
            for module in child if isinstance(child, MomentumEncoder) else [child]:
                targets.append(module)
                blocks = getattr(module, "blocks", None)
                if isinstance(blocks, nn.Module):
                    targets.append(blocks)
        return targets

    def configure_model(self) -> None:
        """With ``compile``, compile :meth:`compile_targets` once, before Lightning moves and wraps the model.

        ``nn.Module.compile`` compiles a module's call in place: the module, its parameters and their names are
        unchanged (no ``_orig_mod.`` in checkpoint keys), and the EMA update of a momentum encoder, which writes
        its parameters in place, is seen by the compiled graph (parameters are graph inputs, not constants).
        """
        if self.hparams.compile and not self._compiled:
            for module in self.compile_targets():
                module.compile(**(self.hparams.compile_kwargs or {}))
            self._compiled = True

    def on_train_start(self) -> None:
        """Give each rank its own random stream, continue a resumed run's stream; give every rank the same probe.

        ``seed_everything`` seeds every rank alike, so rank r would draw the same MAE mask or PIRL
        negatives for its i-th image as every other rank, and the global batch would see W times fewer
        distinct draws. A resumed run restores the random states stored in its checkpoint (rank 0's:
        a single process continues exactly as if never stopped); other ranks, and a resumed checkpoint
        without states, re-derive their stream from the global seed, the rank and the step (restored by
        Lightning before this hook). Weights stay identical: DDP broadcasts rank 0's.
        """
        base = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything; unseeded ranks already differ
        rank, step = self.global_rank, self.trainer.global_step
        restored = self._restored_rng is not None
        if restored:
            set_rng_states(self._restored_rng)
            self._restored_rng = None
        # rank 0 of a resumed run continues its stored stream; other ranks re-derive theirs (step included)
        if base is not None and (rank or (step and not restored)):
            torch.manual_seed((int(base) + 1_000_003 * rank + 7_919 * step) % 2**63)
        if self.probe is not None:
            self.probe.sync_parameters()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the class (so :func:`sslpipe.methods.load_method` can rebuild it) and the probe's optimiser."""
        checkpoint["sslpipe_method"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["rng_states"] = collect_rng_states()
        if self.probe is not None:
            checkpoint["online_probe_optimizer"] = self.probe.optimizer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the online probe's optimiser state (momentum buffers) on resume; keep the random states for
        :meth:`on_train_start`."""
        self._restored_rng = checkpoint.get("rng_states")
        state = checkpoint.get("online_probe_optimizer")
        if self.probe is not None and state is not None:
            self.probe.optimizer.load_state_dict(state)
