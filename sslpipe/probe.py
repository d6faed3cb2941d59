"""The online linear probe: a classifier trained on detached backbone features during pretraining.

It is a component with its own optimiser (SGD with momentum) and its own cosine schedule, not a term of
the self-supervised loss: so it never rides LARS's trust ratio, AdamW's moments or the SSL learning rate,
and no gradient of it can reach the backbone (it sees ``features.detach()`` and takes its gradients with
``torch.autograd.grad`` over its own parameters only). Under DDP the probe's gradients are all-reduced
by the probe itself (one small collective per step), so DDP's reducer ignores its parameters.

Labels ``< 0`` mean "no label" (STL-10's unlabeled split, unlabeled folders): the loss is the mean over
labeled rows of the whole global batch, computed as a masked sum divided by the labeled count, so a
batch without labels gives zero gradient without a host sync and every rank joins the same collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sslpipe.distributed import broadcast_, is_distributed
from sslpipe.optim import warmup_cosine


class OnlineProbe(nn.Module):
    """Linear classifier (optionally behind an affine-free BatchNorm) with its own SGD optimiser.

    Args:
        feature_dim: width of the backbone features.
        num_classes: number of classes.
        lr: peak learning rate (not scaled by the batch size), decayed along a cosine over the run.
        momentum: SGD momentum.
        weight_decay: L2 weight decay of the probe.
        batch_norm: affine-free BatchNorm before the linear layer (MAE's probe recipe): reconstruction
            features share a large common offset with tiny per-sample spread, on which a bare linear
            layer learns slowly.
    """

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"the online probe needs num_classes >= 1, got {num_classes}")
        self.norm = nn.BatchNorm1d(feature_dim, affine=False) if batch_norm else nn.Identity()
        self.linear = nn.Linear(feature_dim, num_classes)
        self.lr = lr
        self.optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of ``features`` (computed in fp32)."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.linear(self.norm(features.float()))

    def masked_loss_sum(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum of cross entropies over labeled rows, number of labeled rows)``; rows with label < 0 add 0."""
        labeled = labels >= 0
        per_row = F.cross_entropy(self(features), labels.clamp_min(0), reduction="none")
        return (per_row * labeled).sum(), labeled.sum()

    def sync_parameters(self) -> None:
        """Give every rank rank 0's weights (DDP does not broadcast parameters it ignores)."""
        for tensor in [*self.parameters(), *self.buffers()]:
            broadcast_(tensor.data)

    def training_step(self, features: torch.Tensor, labels: torch.Tensor, step: int, total_steps: int) -> torch.Tensor:
        """One optimiser step on detached ``features``; returns this rank's mean loss over its labeled rows."""
        with torch.enable_grad():
            loss_sum, count = self.masked_loss_sum(features.detach(), labels)
            params = list(self.parameters())
            grads = torch.autograd.grad(loss_sum, params)
        flat = torch.cat([g.reshape(-1) for g in grads] + [count.reshape(1).to(grads[0].dtype)])
        if is_distributed():  # sum the per-rank sums and counts: the mean over the global batch's labels
            dist.all_reduce(flat)
        total_count = flat[-1].clamp_min(1)
        for p, g in zip(params, torch.split(flat[:-1] / total_count, [p.numel() for p in params])):
            p.grad = g.view_as(p)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * warmup_cosine(step, 0, total_steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum.detach() / count.clamp_min(1)
