"""``model.compile``: in-place compilation that keeps checkpoint keys and momentum encoders working.

Compilation is lazy (nothing is traced until a compiled module runs), so the key and hook checks are fast; the
check that a compiled model trains exactly like its eager twin runs real graphs and is marked slow.
"""

from __future__ import annotations

import types

import pytest
import pytorch_lightning as pl
import torch

from sslpipe.data import SSLDataModule
from sslpipe.methods import MaskedAutoencoder, MoCoV2, SimCLR

VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs={"patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 3},
    image_size=16,
    num_classes=4,
)
RESNET = dict(backbone="resnet18", image_size=16, num_classes=4)


def _moco(compile: bool, **kwargs) -> MoCoV2:
    torch.manual_seed(0)
    return MoCoV2(
        proj_hidden_dim=16, proj_output_dim=8, queue_size=16, shuffle_bn=False, compile=compile, **{**VIT, **kwargs}
    )


def _is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_compile_targets_cover_backbone_heads_and_momentum_copies_but_not_probe_or_state():
    model = _moco(compile=True, compile_kwargs={"backend": "eager"})
    model.configure_model()
    compiled = {name for name, m in model.named_modules() if _is_compiled(m)}
    assert compiled == {
        "backbone",
        "backbone.blocks",
        "projector",
        "key_encoder.backbone",
        "key_encoder.backbone.blocks",
        "key_encoder.projector",
    }
    model.configure_model()  # Lightning calls the hook on every fit: compiling twice must not wrap twice
    assert {name for name, m in model.named_modules() if _is_compiled(m)} == compiled

    mae = MaskedAutoencoder(decoder_dim=16, decoder_depth=1, decoder_heads=2, compile=True, **VIT)
    mae.configure_model()
    # the masked models call the ViT's blocks, not its forward: the block stack must be compiled itself
    assert {"backbone.blocks", "decoder"} <= {name for name, m in mae.named_modules() if _is_compiled(m)}
    assert not any(_is_compiled(m) for m in mae.probe.modules())


def test_compiled_and_eager_checkpoints_are_interchangeable():
    eager, compiled = _moco(compile=False), _moco(compile=True)
    compiled.configure_model()
    keys = list(compiled.state_dict())
    assert keys == list(eager.state_dict())
    assert not any("_orig_mod" in key for key in keys)
    torch.manual_seed(1)
    other = _moco(compile=True)
    other.configure_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    eager.load_state_dict(other.state_dict(), strict=True)  # compiled -> eager
    compiled.load_state_dict(eager.state_dict(), strict=True)  # eager -> compiled
    for (name, a), b in zip(compiled.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_lightning_compiles_through_configure_model_and_saves_plain_keys(tmp_path):
    model = SimCLR(proj_hidden_dim=16, proj_output_dim=8, compile=True, online_probe=False, **RESNET)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=0,  # no step: the graphs would compile on the first call; the hook ran before
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, SSLDataModule("fake", image_size=16, batch_size=4, num_workers=0))
    assert _is_compiled(model.backbone) and _is_compiled(model.projector)
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert list(state) == list(SimCLR(proj_hidden_dim=16, proj_output_dim=8, online_probe=False, **RESNET).state_dict())


@pytest.mark.slow
def test_a_compiled_momentum_model_trains_like_its_eager_twin():
    """Two steps with an EMA update between them: a graph that had baked the key encoder's weights in as
    constants would give the first step's keys again in the second step."""
    # key_momentum 0: the EMA copies the online weights, so stale weights in a graph would show at full size
    models = [_moco(compile=c, compile_kwargs={"backend": "aot_eager"}, key_momentum=0.0) for c in (False, True)]
    g = torch.Generator().manual_seed(2)
    batches = [[torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)] for _ in range(2)]
    results = []
    for model in models:
        model.configure_model()
        model.trainer = types.SimpleNamespace(global_step=0, estimated_stepping_batches=10)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        losses = []
        for step, views in enumerate(batches):
            loss = model.ssl_step(views).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            model.key_encoder.update(step, 10)
            losses.append(loss.detach())
        results.append((losses, model.state_dict()))
    (eager_losses, eager_state), (compiled_losses, compiled_state) = results
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
