"""`sslpipe export`: safetensors that load strictly into plain timm/torchvision models and give sslpipe's features.

Each test builds the plain model itself (as a user would, from the library alone) and compares its
features with the sslpipe method's ``forward`` on the same batch; the card's own snippet is run too.
"""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from sslpipe.checkpoints import CheckpointError
from sslpipe.evaluation.export import export_backbone
from sslpipe.methods import MaskedAutoencoder, MoCoV2, SimCLR
from tests.checkpoints import perturb_, save_method_checkpoint
from tests.helpers import run_cli

SMALL_HEAD = dict(proj_hidden_dim=16, proj_output_dim=8)


@pytest.fixture(autouse=True)
def one_thread():
    """Small models: a second OpenMP thread only adds wake-up latency on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _export(tmp_path, method: nn.Module, fmt=None, name="backbone") -> tuple[nn.Module, dict, dict]:
    """Checkpoint ``method`` (perturbed), export it; return the method, the exported tensors and the card."""
    perturb_(method).eval()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    ckpt = save_method_checkpoint(method, str(run / "checkpoints" / "last.ckpt"))
    weights, card = export_backbone(ckpt, str(tmp_path / "out" / f"{name}.safetensors"), fmt)
    assert card == str(tmp_path / "out" / f"{name}.json")
    with open(card) as f:
        return method, load_file(weights), json.load(f)


def _batch(size: int) -> torch.Tensor:
    return torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))


def _load_strict(plain: nn.Module, state: dict) -> None:
    """strict=True, and every entry of the plain model is in the file: BatchNorm quietly fills a missing
    num_batches_tracked even under strict=True, so compare the key sets as well."""
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state, strict=True)


def _same_features(method: nn.Module, plain: nn.Module, size: int) -> None:
    x = _batch(size)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), method.eval()(x), rtol=1e-4, atol=1e-5)


def test_timm_resnet(tmp_path):
    method, state, card = _export(tmp_path, SimCLR(backbone="resnet18", image_size=32, **SMALL_HEAD))
    plain = timm.create_model("resnet18", pretrained=False, num_classes=0)
    _load_strict(plain, state)  # no fc weights exported, none expected
    _same_features(method, plain, 32)
    assert card["model"] == {"library": "timm", "name": "resnet18", "kwargs": {"num_classes": 0}, "head": "none"}
    assert card["method"] == "simclr" and card["feature_dim"] == 512 and card["cifar_stem"] is False
    assert card["data"]["mean"] == [0.3053] * 3 and card["data"]["std"] == [0.3759] * 3
    assert card["data"]["image_size"] == 32 and card["checkpoint_epoch"] == 3 and card["global_step"] == 12


def test_timm_resnet_cifar_stem_moco_query_encoder(tmp_path, monkeypatch):
    method = MoCoV2(
        backbone="resnet18", cifar_stem=True, channels_last=True, image_size=32, queue_size=32, **SMALL_HEAD
    )
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / "metrics.json", "w") as f:
        json.dump({"method": "moco_v2", "epochs": 4, "online_linear_top1": 61.5, "train_loss": 3.2}, f)
    method, state, card = _export(tmp_path, method)
    assert not any(k.startswith(("key_", "backbone.")) for k in state)  # the query backbone, prefix removed
    assert not torch.equal(state["conv1.weight"], method.key_encoder.backbone.conv1.weight)  # not the key encoder
    plain = timm.create_model("resnet18", pretrained=False, num_classes=0)
    plain.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)  # what the card tells
    plain.maxpool = nn.Identity()
    _load_strict(plain, state)
    _same_features(method, plain, 32)
    assert card["cifar_stem"] is True and "maxpool = torch.nn.Identity()" in card["load"]
    assert card["metrics"] == {"online_linear_top1": 61.5} and card["epochs"] == 4
    # the card's snippet itself, run where the card lies
    monkeypatch.chdir(tmp_path / "out")
    namespace: dict = {}
    exec(card["load"], namespace)
    _same_features(method, namespace["model"], 32)


def test_torchvision_resnet(tmp_path):
    method, state, card = _export(tmp_path, SimCLR(backbone="torchvision/resnet18", image_size=32, **SMALL_HEAD))
    plain = torchvision.models.resnet18()
    plain.fc = nn.Identity()
    _load_strict(plain, state)
    _same_features(method, plain, 32)
    assert card["model"]["head"] == "fc" and "model.fc = torch.nn.Identity()" in card["load"]


def test_timm_resnet_exported_for_torchvision(tmp_path):
    """timm's and torchvision's ResNet-18 share one layout: --format picks the target library."""
    method, state, card = _export(tmp_path, SimCLR(backbone="resnet18", image_size=32, **SMALL_HEAD), "torchvision")
    plain = torchvision.models.resnet18()
    plain.fc = nn.Identity()
    _load_strict(plain, state)
    _same_features(method, plain, 32)
    assert card["format"] == "torchvision"


@pytest.mark.parametrize("pool,timm_pool", [("cls", dict(global_pool="token")), ("mean", dict(global_pool="avg"))])
def test_mae_vit_small_images_and_patches(tmp_path, pool, timm_pool):
    vit = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"patch_size": 4, "depth": 2}, image_size=32)
    method = MaskedAutoencoder(pool=pool, decoder_dim=16, decoder_depth=1, decoder_heads=2, **vit)
    method, state, card = _export(tmp_path, method)
    assert state["pos_embed"].shape == (1, 1 + 8 * 8, 192)  # the fixed sin-cos codes, an ordinary parameter
    torch.testing.assert_close(state["pos_embed"], method.backbone.pos_embed.detach())
    # sslpipe's mean pool averages the final-LayerNorm patch tokens: timm's avg with fc_norm=False
    fc_norm = {"fc_norm": False} if pool == "mean" else {}
    plain = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=0, **timm_pool, **fc_norm
    )
    _load_strict(plain, state)
    _same_features(method, plain, 32)
    assert card["model"]["kwargs"] == {
        "num_classes": 0,
        "patch_size": 4,
        "depth": 2,
        "img_size": 32,
        **timm_pool,
        **fc_norm,
    }
    assert card["patch_size"] == 4 and card["pool"] == pool and card["method"] == "mae"
    if pool == "mean":  # timm's default avg pooling (LayerNorm after the mean) loads but gives other features
        other = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=0)
        _load_strict(other, state)
        with torch.no_grad():
            assert not torch.allclose(other.eval()(_batch(32)), method(_batch(32)), atol=1e-3)


def test_export_errors(tmp_path):
    vit = dict(backbone="vit_tiny_patch16_224", backbone_kwargs={"patch_size": 4, "depth": 1}, image_size=32)
    method = perturb_(MaskedAutoencoder(decoder_dim=16, decoder_depth=1, decoder_heads=2, **vit))
    ckpt = save_method_checkpoint(method, str(tmp_path / "mae.ckpt"))
    with pytest.raises(ValueError, match="--format timm"):
        export_backbone(ckpt, str(tmp_path / "x.safetensors"), "torchvision")
    with pytest.raises(CheckpointError, match="--checkpoint"):
        export_backbone(str(tmp_path / "missing.ckpt"), str(tmp_path / "x.safetensors"))
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_export_command_on_a_lightning_checkpoint(tmp_path):
    """A checkpoint written by a real Lightning Trainer loads with weights_only=True and exports via the CLI."""
    import pytorch_lightning as pl

    from sslpipe.data import SSLDataModule

    data = SSLDataModule(dataset="digits", image_size=16, batch_size=16, num_workers=0)
    method = SimCLR(backbone="resnet10t", image_size=16, warmup_epochs=0, channels_last=True, **SMALL_HEAD)
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(method, datamodule=data)
    ckpt = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(ckpt)
    out = str(tmp_path / "exported" / "simclr.safetensors")
    printed, _ = run_cli(["export", "--checkpoint", ckpt, "--output", out])
    assert printed == out
    plain = timm.create_model("resnet10t", num_classes=0)
    _load_strict(plain, load_file(out))
    _same_features(method, plain, 16)
