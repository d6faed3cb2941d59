"""Checkpoint reading: refused when the pickle would run code, older sslpipe layouts mapped onto today's classes."""

import os

import pytest
import torch

from sslpipe.checkpoints import CheckpointError, load_checkpoint, load_method
from sslpipe.methods import MaskedAutoencoder, MoCoV2, MoCoV3

SMALL = dict(backbone="resnet18", image_size=16, proj_hidden_dim=16, proj_output_dim=8, num_classes=10)


class _Payload:
    """Unpickling this object creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_whose_pickle_runs_code_is_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="weights_only=True") as err:
        load_checkpoint(str(path))
    assert str(path) in str(err.value)
    assert not marker.exists()


def _write_legacy(tmp_path, model, hparams: dict, renames: dict) -> str:
    """A checkpoint in the layout an earlier sslpipe wrote: old class path, old parameter names."""
    state = {}
    for key, value in model.state_dict().items():
        for new, old in renames.items():
            if key.startswith(new):
                key = old + key[len(new) :]
                break
        state[key] = value
    path = str(tmp_path / "legacy.ckpt")
    torch.save({"state_dict": state, "hyper_parameters": hparams, "sslpipe_method": hparams.pop("_method")}, path)
    return path


@pytest.mark.parametrize("mode", ["v2", "v3"])
def test_checkpoints_of_the_single_moco_class_load_as_moco_v2_or_v3(tmp_path, mode):
    torch.manual_seed(0)
    cls = MoCoV2 if mode == "v2" else MoCoV3
    extra = {"queue_size": 32} if mode == "v2" else {"pred_hidden_dim": 16}
    model = cls(**SMALL, **extra)
    hparams = {**SMALL, **extra, "mode": mode, "proj_batch_norm": None, "_method": "sslpipe.methods.moco.MoCo"}
    if mode == "v2":
        hparams.update(pred_hidden_dim=4096, freeze_patch_embed=False)  # the old class took them in both modes
    renames = {
        "key_encoder.backbone.": "key_backbone.",
        "key_encoder.projector.": "key_projector.",
        "key_encoder.num_updates": "key_step",
        "probe.linear.": "probe.",
    }
    loaded = load_method(_write_legacy(tmp_path, model, hparams, renames))
    assert type(loaded) is cls
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    if mode == "v2":
        assert loaded.hparams.proj_batch_norm is False  # None meant the paper's choice: no BN in v2's head


def test_masked_model_checkpoints_with_the_probe_as_a_sequential_load(tmp_path):
    torch.manual_seed(0)
    vit = dict(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs={"patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 3},
        image_size=16,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
    )
    model = MaskedAutoencoder(**vit)
    model.probe.norm.running_mean.add_(1.5)  # a non-default buffer, so a dropped key would show
    hparams = {**vit, "_method": "sslpipe.methods.mae.MaskedAutoencoder"}
    path = _write_legacy(tmp_path, model, hparams, {"probe.norm.": "probe.0.", "probe.linear.": "probe.1."})
    loaded = load_method(path)
    assert torch.equal(loaded.probe.norm.running_mean, model.probe.norm.running_mean)
    assert torch.equal(loaded.probe.linear.weight, model.probe.linear.weight)


def test_missing_checkpoint_names_the_path_and_the_fix(tmp_path):
    missing = os.path.join(tmp_path, "nope.ckpt")
    with pytest.raises(CheckpointError, match="last.ckpt") as err:
        load_checkpoint(missing)
    assert missing in str(err.value)
