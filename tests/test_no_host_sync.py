"""No device-to-host synchronisation inside a training step, for every method.

On a GPU, ``.item()``, ``int(t)``, ``bool(t)``, ``t.tolist()`` or an op with a data-dependent output shape
makes the host wait for the device every step. On the CPU these calls are free but still happen, so the test
forbids them while a full step runs: the method's ``training_step`` (loss, queue/bank writes, the online
probe's own optimiser step) and the EMA update of its momentum encoders.
"""

import types

import pytest
import torch

from sslpipe.methods import PIRL, DenoisingAutoencoder, MaskedAutoencoder, MoCoV2, MoCoV3, SimCLR, SimMIM

RESNET = dict(backbone="resnet18", image_size=16, proj_hidden_dim=16, proj_output_dim=8, num_classes=4)
VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs={"patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 3},
    image_size=16,
    num_classes=4,
)
SYNCS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def _methods():
    return {
        "simclr": (lambda: SimCLR(**RESNET), "pair"),
        "moco_v2": (lambda: MoCoV2(queue_size=32, bn_splits=2, **RESNET), "pair"),
        "moco_v3": (lambda: MoCoV3(pred_hidden_dim=16, **RESNET), "pair"),
        "pirl_nce": (lambda: PIRL(num_samples=40, num_negatives=10, tile_dim=4, loss_form="nce", **RESNET), "jigsaw"),
        "pirl_infonce": (
            lambda: PIRL(num_samples=40, num_negatives=10, tile_dim=4, loss_form="infonce", **RESNET),
            "jigsaw",
        ),
        "mae": (lambda: MaskedAutoencoder(decoder_dim=32, decoder_depth=1, decoder_heads=2, **VIT), "single"),
        "simmim": (lambda: SimMIM(mask_block_size=1, **VIT), "single"),
        "dae": (lambda: DenoisingAutoencoder(**VIT), "single"),
    }


def _batch(kind: str, step: int):
    g = torch.Generator().manual_seed(step)
    images = torch.randn(8, 3, 16, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 3, -1, -1, 0, 1])  # some unlabeled rows
    indices = torch.arange(8) + 8 * step
    if kind == "pair":
        views = [images, torch.randn(8, 3, 16, 16, generator=g)]
    elif kind == "jigsaw":
        views = [images, torch.randn(8, 9, 3, 8, 8, generator=g), torch.zeros(8, dtype=torch.long)]
    else:
        views = [images]
    return views, labels, indices


@pytest.mark.parametrize("name", list(_methods()))
def test_a_training_step_never_waits_for_the_device(name, monkeypatch):
    torch.manual_seed(0)
    build, kind = _methods()[name]
    model = build()
    model.trainer = types.SimpleNamespace(global_step=1, estimated_stepping_batches=100)
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)
    model.training_step(_batch(kind, 0), 0)  # warm-up: PIRL estimates its NCE normaliser once, on the first batch

    def forbidden(*args, **kwargs):
        raise AssertionError("device-to-host sync inside the training step")

    for attr in SYNCS:
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    monkeypatch.setattr(torch, "unique", forbidden)
    loss = model.training_step(_batch(kind, 1), 1)
    loss.backward()
    for encoder in model.momentum_encoders():
        encoder.update(1, 100)
    monkeypatch.undo()
    assert torch.isfinite(loss)
