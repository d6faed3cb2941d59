"""The online probe component: its own SGD step (formula written out), masked labels, no reach into the backbone."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from sslpipe.data import SSLDataModule
from sslpipe.methods import MaskedAutoencoder, SimCLR
from sslpipe.probe import OnlineProbe


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 6, generator=g), torch.tensor([0, 2, -1, 1, -1])


def test_probe_step_is_one_sgd_step_on_the_mean_loss_of_labeled_rows():
    torch.manual_seed(0)
    probe = OnlineProbe(6, 3, lr=0.5, momentum=0.9, weight_decay=0.01)
    features, labels = _problem()
    w, b = probe.linear.weight.detach().clone(), probe.linear.bias.detach().clone()
    loss = probe.training_step(features, labels, step=3, total_steps=10)
    # Softmax regression written out: dL/dlogits = (p - onehot) / n_labeled on labeled rows, 0 elsewhere.
    labeled = labels >= 0
    x, y = features[labeled], labels[labeled]
    p = torch.softmax(x @ w.T + b, dim=1)
    delta = (p - F.one_hot(y, 3).float()) / len(y)
    grad_w, grad_b = delta.T @ x, delta.sum(0)
    lr = 0.5 * 0.5 * (1 + math.cos(math.pi * 3 / 10))  # cosine schedule at step 3 of 10, no warm-up
    # First SGD step: the momentum buffer is the decayed gradient itself.
    torch.testing.assert_close(probe.linear.weight, w - lr * (grad_w + 0.01 * w))
    torch.testing.assert_close(probe.linear.bias, b - lr * (grad_b + 0.01 * b))
    assert float(loss) == pytest.approx(float(-torch.log(p[torch.arange(len(y)), y]).mean()), rel=1e-5)


def test_probe_step_without_labels_changes_nothing_and_never_syncs(monkeypatch):
    probe = OnlineProbe(6, 3, lr=0.5)
    before = [t.clone() for t in probe.parameters()]
    features = _problem()[0]

    def refuse(*args, **kwargs):
        raise AssertionError("host sync inside the probe step")

    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    loss = probe.training_step(features, torch.full((5,), -1), step=0, total_steps=10)
    monkeypatch.undo()
    assert float(loss) == 0.0
    for t, t0 in zip(probe.parameters(), before):
        assert torch.equal(t, t0)


def _one_step(model):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, SSLDataModule("digits", image_size=16, batch_size=16, num_workers=0))
    return model


def test_probe_never_changes_how_the_backbone_trains():
    kw = dict(
        backbone="resnet18",
        image_size=16,
        proj_hidden_dim=16,
        proj_output_dim=8,
        optimizer="sgd",
        base_lr=0.5,
        warmup_epochs=0,
        num_classes=10,
    )
    with_probe = SimCLR(online_probe=True, **kw)
    without = SimCLR(online_probe=False, **kw)
    without.load_state_dict({k: v for k, v in with_probe.state_dict().items() if not k.startswith("probe.")})
    probe_before = with_probe.probe.linear.weight.detach().clone()
    _one_step(with_probe), _one_step(without)
    trained = dict(without.named_parameters())
    for name, p in with_probe.named_parameters():
        if not name.startswith("probe."):
            torch.testing.assert_close(p, trained[name], msg=name)
    assert not torch.equal(with_probe.probe.linear.weight, probe_before)  # the probe itself did learn
    ssl_params = {id(p) for g in with_probe.optimizers().param_groups for p in g["params"]}
    assert not ssl_params & {id(p) for p in with_probe.probe.parameters()}  # not in the SSL optimiser


def test_masked_models_probe_behind_affine_free_batch_norm_and_probe_state_is_checkpointed(tmp_path):
    vit = dict(
        backbone="vit_tiny_patch16_224",
        backbone_kwargs={"patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 3},
        image_size=16,
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=2,
    )
    model = MaskedAutoencoder(**vit)
    assert isinstance(model.probe.norm, torch.nn.BatchNorm1d) and not model.probe.norm.affine
    assert isinstance(SimCLR(backbone="resnet18", image_size=16).probe.norm, torch.nn.Identity)
    features, labels = _problem()
    probe = OnlineProbe(6, 3)
    probe.training_step(features, labels, 0, 10)
    checkpoint = {}
    holder = SimCLR(backbone="resnet18", image_size=16, proj_hidden_dim=16, proj_output_dim=8)
    holder.probe = probe
    holder.on_save_checkpoint(checkpoint)
    fresh = SimCLR(backbone="resnet18", image_size=16, proj_hidden_dim=16, proj_output_dim=8)
    fresh.probe = OnlineProbe(6, 3)
    fresh.on_load_checkpoint(checkpoint)
    saved = probe.optimizer.state_dict()["state"]
    restored = fresh.probe.optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys() and saved
    for key in saved:
        torch.testing.assert_close(restored[key]["momentum_buffer"], saved[key]["momentum_buffer"])
