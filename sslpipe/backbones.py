"""Backbones by name from timm (default) or torchvision, classifier removed, feature width discovered.

Initialisation, per family the configs use (what pretraining starts from, and what :func:`standard_init_`
changes for the random-init baseline):

* timm ResNets (``resnet18``, ``resnet50``): Kaiming-normal (fan-out) convolutions, BatchNorm scale 1 / shift 0,
  then ``zero_init_last=True`` zeroes the scale of the last BatchNorm of every residual block: each block starts
  as the identity, a training aid (Goyal et al., 2017) that leaves the *untrained* network a stem plus pooling
  (digits kNN 17.5%). :func:`standard_init_` sets those scales back to 1, exactly timm's ``zero_init_last=False``.
* torchvision ResNets (``torchvision/resnet18``): the same Kaiming init with ``zero_init_residual=False`` by
  default, so nothing is zeroed; with ``zero_init_residual=True`` in ``backbone_kwargs`` :func:`standard_init_`
  undoes it like timm's.
* timm ViTs (``vit_tiny/small/base_patch16_224``): truncated-normal (std 0.02) linear layers and position
  embeddings, zero biases, LayerNorm scale 1 / shift 0, and no LayerScale unless ``init_values`` is given (no
  config gives it): nothing zeroed, :func:`standard_init_` changes nothing. With ``init_values`` (e.g. 1e-5)
  the LayerScale gammas nearly zero each residual branch; :func:`standard_init_` sets them to 1 (no scaling).
"""

from __future__ import annotations

import difflib
from typing import Any, Optional

import torch
from torch import nn

from sslpipe.errors import ConfigError


def _apply_cifar_stem(model: nn.Module, name: str) -> None:
    """Swap a ResNet's 7x7/stride-2 conv + max-pool for a 3x3/stride-1 conv (SimCLR's CIFAR variant).

    At 32 px the standard stem throws away 4x of resolution before the first block.
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(f"cifar_stem needs a ResNet-style backbone with conv1/maxpool; {name!r} has none")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def build_backbone(
    name: str = "resnet18",
    cifar_stem: bool = False,
    image_size: Optional[int] = None,
    **kwargs: Any,
) -> tuple[nn.Module, int]:
    """Build a headless backbone and return it with its output feature width.

    Args:
        name: a timm model name (``resnet18``, ``resnet50``, ``vit_tiny_patch16_224``, ...) or
            ``torchvision/<name>`` for a torchvision model.
        cifar_stem: replace a ResNet stem by a 3x3 stride-1 conv without max-pool (for 32-px images).
        image_size: passed to timm ViTs as ``img_size`` so position embeddings match the data.
        **kwargs: passed to the constructor (e.g. ``patch_size=4``, ``global_pool='avg'`` for a ViT).

    Returns:
        ``(module, feature_dim)``; ``module(x)`` maps ``(B, 3, H, W)`` to pooled ``(B, feature_dim)``.
    """
    if name.startswith("torchvision/"):
        import torchvision

        tv_name = name.split("/", 1)[1]
        try:
            model = torchvision.models.get_model(tv_name, weights=None, **kwargs)
        except ValueError as err:
            raise ConfigError(f"model.backbone={name!r} is unknown: {err}") from err
        if cifar_stem:
            _apply_cifar_stem(model, name)
        for head in ("fc", "classifier", "heads", "head"):
            if hasattr(model, head):
                setattr(model, head, nn.Identity())
                break
        return model, _probe_width(model, image_size or 224)

    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(
            f"model.backbone={name!r} is unknown: choose a timm name (timm.list_models()"
            + (f", e.g. {', '.join(close)}" if close else "")
            + ") or 'torchvision/<name>'"
        )
    if image_size is not None and ("vit" in name or "deit" in name or "swin" in name or "eva" in name):
        kwargs.setdefault("img_size", image_size)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    patch_embed = getattr(model, "patch_embed", None)
    patch = getattr(patch_embed, "patch_size", None)
    if image_size is not None and patch is not None and not getattr(model, "dynamic_img_size", False):
        patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
        if image_size % patch[0] or image_size % patch[1]:
            side = patch[0]
            raise ConfigError(
                f"data.image_size={image_size} is not divisible by the patch size {side} of {name!r}: choose an image "
                f"size that is a multiple of {side} (e.g. {max(side, image_size // side * side)}) or set "
                "model.backbone_kwargs.patch_size"
            )
    if cifar_stem:
        _apply_cifar_stem(model, name)
    width = getattr(model, "num_features", None) or _probe_width(model, image_size or 224)
    return model, int(width)


@torch.no_grad()
def standard_init_(module: nn.Module) -> nn.Module:
    """Undo zero-initialised residual branches in a freshly built network, in place; return it.

    Every affine normalisation layer (BatchNorm, SyncBatchNorm, GroupNorm, LayerNorm) gets PyTorch's default
    scale 1 and shift 0, and every timm LayerScale gamma 1. For the backbones above that is their standard
    initialisation without the zero-init trick (timm ResNet: identical to ``zero_init_last=False`` from the
    same seed); random convolution and linear weights are untouched and no random numbers are drawn.

    Meant for the random-init *baseline* (:func:`sslpipe.checkpoints.build_method` with ``random_init``):
    an untrained network whose blocks are identities scores near chance and flatters every method.
    Pretraining keeps each library's own init. Call it only on an untrained network: it resets learned
    normalisation parameters.
    """
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    for m in module.modules():
        if isinstance(m, norms):
            if getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
        elif type(m).__name__ in ("LayerScale", "LayerScale2d") and isinstance(getattr(m, "gamma", None), torch.Tensor):
            m.gamma.fill_(1.0)
    return module


@torch.no_grad()
def _probe_width(model: nn.Module, image_size: int) -> int:
    """Feature width found by running one dummy image (for models that do not advertise it)."""
    was_training = model.training
    model.eval()
    width = model(torch.zeros(1, 3, image_size, image_size)).flatten(1).shape[1]
    model.train(was_training)
    return int(width)
