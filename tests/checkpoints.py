"""Checkpoints of sslpipe methods built directly (no training), laid out as Lightning writes them."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BatchNorm buffer non-default values, so a dropped or mixed-up tensor shows.

    Fresh BatchNorm layers hold mean 0 / var 1 / weight 1 / bias 0, exactly what a missing entry would
    silently fall back to; momentum-copied encoders would equal their online twin.
    """
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.02 * torch.randn(p.shape, generator=g))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)
    return model


def save_method_checkpoint(
    method: nn.Module, path: str, dataset: str = "digits", epoch: int = 3, global_step: int = 12
) -> str:
    """Write ``method`` as ``sslpipe pretrain`` would: state_dict, hyper_parameters, sslpipe_method, data settings."""
    hparams = dict(method.hparams)
    cls = type(method)
    torch.save(
        {
            "epoch": epoch,
            "global_step": global_step,
            "state_dict": method.state_dict(),
            "hyper_parameters": {**hparams, "_class_path": f"{cls.__module__}.{cls.__qualname__}"},
            "datamodule_hyper_parameters": {
                "dataset": dataset,
                "root": "data",
                "image_size": hparams["image_size"],
                "batch_size": 32,
                "eval_batch_size": 512,
                "num_workers": 0,
            },
            "sslpipe_method": f"{cls.__module__}.{cls.__qualname__}",
        },
        path,
    )
    return path
