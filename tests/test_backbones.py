"""Backbones by name: feature widths, the CIFAR stem, a small-patch ViT, torchvision models, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sslpipe.backbones import build_backbone


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_resnet18_width_and_output():
    model, width = build_backbone("resnet18")
    assert width == 512
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 512)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # classifier removed


def test_cifar_stem():
    standard, _ = build_backbone("resnet18")
    model, width = build_backbone("resnet18", cifar_stem=True)
    assert width == 512
    assert isinstance(model.conv1, nn.Conv2d)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    assert model.conv1.in_channels == 3 and model.conv1.out_channels == standard.conv1.out_channels
    assert isinstance(model.maxpool, nn.Identity)
    assert standard.conv1.kernel_size == (7, 7) and not isinstance(standard.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # 32 px: 4x4 maps before pooling with the CIFAR stem (only strides 2,2,2 left), 1x1 with the standard one
        assert model.eval().forward_features(x).shape[-2:] == (4, 4)
        assert standard.eval().forward_features(x).shape[-2:] == (1, 1)
        assert model(x).shape == (2, 512)


def test_vit_small_patches_on_32px():
    model, width = build_backbone("vit_tiny_patch16_224", image_size=32, patch_size=4)
    assert width == 192
    assert model.patch_embed.proj.kernel_size == (4, 4)
    assert model.pos_embed.shape[1] == (32 // 4) ** 2 + 1  # 64 patches + class token
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 192)


def test_torchvision_resnet18():
    model, width = build_backbone("torchvision/resnet18", image_size=32)
    assert width == 512
    assert isinstance(model.fc, nn.Identity)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    stem, _ = build_backbone("torchvision/resnet18", cifar_stem=True, image_size=32)
    assert stem.conv1.kernel_size == (3, 3) and isinstance(stem.maxpool, nn.Identity)


def test_unknown_names():
    with pytest.raises(ValueError, match="model.backbone='resnet17' is unknown"):
        build_backbone("resnet17")
    with pytest.raises(ValueError, match="model.backbone='torchvision/resnet17' is unknown"):
        build_backbone("torchvision/resnet17")


def test_cifar_stem_needs_a_resnet():
    with pytest.raises(ValueError, match="cifar_stem"):
        build_backbone("vit_tiny_patch16_224", cifar_stem=True, image_size=32, patch_size=4)
