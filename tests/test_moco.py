"""MoCo v2/v3: momentum encoder, frozen key encoder, InfoNCE losses, shuffle-BN, resume, end-to-end CLI."""

import math
import os
import types

import pytest
import torch

# Only light imports at module level: the gloo test's worker processes import this module again.
from sslpipe.distributed import batch_shuffle, batch_unshuffle
from sslpipe.losses import batch_infonce_loss, infonce_loss
from sslpipe.momentum import cosine_momentum, ema_update_
from tests.helpers import TINY, read_metrics, run_cli, run_distributed

SMALL = dict(
    backbone="resnet18",
    image_size=16,
    proj_hidden_dim=32,
    proj_output_dim=16,
    pred_hidden_dim=32,
    optimizer="sgd",
    base_lr=0.05,
    warmup_epochs=0,
    num_classes=10,
)


def _moco(mode: str = "v2", **kwargs):
    """A small MoCo v2 or v3 (ResNet-18 at 16 px, narrow heads); ``kwargs`` override :data:`SMALL`."""
    from sslpipe.methods import MoCoV2, MoCoV3

    if mode == "v2":
        return MoCoV2(**{**{k: v for k, v in SMALL.items() if k != "pred_hidden_dim"}, **kwargs})
    return MoCoV3(**{**SMALL, **kwargs})


def _fake_trainer(global_step: int, total: int = 10) -> types.SimpleNamespace:
    return types.SimpleNamespace(global_step=global_step, estimated_stepping_batches=total)


def test_momentum_update_follows_the_formula_after_each_optimiser_step():
    torch.manual_seed(0)
    model = _moco(mode="v3", key_momentum=0.9, key_momentum_cosine=True, shuffle_bn=False)
    with torch.no_grad():  # make online and key weights differ, as after some optimiser steps
        for p in list(model.backbone.parameters()) + list(model.projector.parameters()):
            p.add_(torch.randn_like(p))
        model.backbone.bn1.running_mean.add_(3.0)
    key_before = [p.clone() for p in model.key_encoder.parameters()]
    online = [p.clone() for p in list(model.backbone.parameters()) + list(model.projector.parameters())]
    model.key_encoder.num_updates.fill_(3)
    model.trainer = _fake_trainer(global_step=3, total=10)  # three steps taken before this one
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # no gradients: the step leaves the weights alone
    model.optimizer_step(0, 0, optimizer, lambda: None)
    m = 1 - (1 - 0.9) * (1 + math.cos(math.pi * 3 / 10)) / 2  # cosine schedule at step 3 of 10, written out
    after = list(model.key_encoder.parameters())
    assert len(after) == len(online)
    for k_new, k_old, q in zip(after, key_before, online):
        torch.testing.assert_close(k_new, m * k_old + (1 - m) * q)
    # buffers copied
    assert torch.equal(model.key_encoder.backbone.bn1.running_mean, model.backbone.bn1.running_mean)
    assert int(model.key_encoder.num_updates) == 4


def test_cosine_momentum_end_points_and_plain_ema():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    w_a, w_b = a.weight.detach().clone(), b.weight.detach().clone()
    ema_update_(a, b, 0.25)
    torch.testing.assert_close(a.weight, 0.25 * w_a + 0.75 * w_b)
    with pytest.raises(ValueError, match="momentum m"):
        ema_update_(a, b, 1.5)


@pytest.mark.parametrize("mode", ["v2", "v3"])
def test_key_encoder_gets_no_gradient_and_is_not_optimised(mode):
    torch.manual_seed(0)
    model = _moco(mode=mode, bn_splits=2, **({"queue_size": 40} if mode == "v2" else {}))
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    out = model.ssl_step(views, torch.arange(8))
    out.loss.backward()
    key_params = list(model.key_encoder.parameters())
    assert all(not p.requires_grad and p.grad is None for p in key_params)
    assert all(p.grad is not None for p in model.backbone.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not trainable & {id(p) for p in key_params}
    if mode == "v2":
        assert int(model.queue.ptr) == 8  # the step enqueued its 8 keys, as unit vectors
        torch.testing.assert_close(model.queue.queue[:8].norm(dim=1), torch.ones(8))


def _infonce_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> float:
    """Mean over queries of -log(exp(pos) / (exp(pos) + sum exp(negs))) of cosines / tau, in float64 loops."""
    total = 0.0
    for i in range(len(q)):
        qi = q[i].double() / q[i].double().norm()
        ki = k[i].double() / k[i].double().norm()
        pos = float(qi @ ki) / tau
        negs = [float(qi @ queue[j].double()) / float(queue[j].double().norm()) / tau for j in range(len(queue))]
        total += -pos + math.log(math.exp(pos) + sum(math.exp(n) for n in negs))
    return total / len(q)


@pytest.mark.parametrize("block", [None, 3])
def test_infonce_with_queue_matches_a_loop(block):
    torch.manual_seed(0)
    q, k, queue = torch.randn(5, 4), torch.randn(5, 4), torch.nn.functional.normalize(torch.randn(7, 4), dim=1)
    loss = infonce_loss(q, k, queue, 0.2, block=block)
    assert float(loss) == pytest.approx(_infonce_reference(q, k, queue, 0.2), rel=1e-5)


def _batch_infonce_reference(q_all: torch.Tensor, k_all: torch.Tensor, rows: range, tau: float) -> float:
    """Mean over ``rows`` of -log softmax of q_i's own key among all keys, by loops."""
    total = 0.0
    for i in rows:
        qi = q_all[i].double() / q_all[i].double().norm()
        sims = [float(qi @ (k_all[j].double() / k_all[j].double().norm())) / tau for j in range(len(k_all))]
        total += -sims[i] + math.log(sum(math.exp(s) for s in sims))
    return total / len(rows)


@pytest.mark.parametrize("block", [None, 4])
def test_batch_infonce_loss_matches_a_loop_on_one_process(block):
    torch.manual_seed(1)
    q, k = torch.randn(6, 5), torch.randn(6, 5)
    loss = batch_infonce_loss(q, k, 0.2, block=block)
    assert float(loss) == pytest.approx(_batch_infonce_reference(q, k, range(6), 0.2), rel=1e-5)


def test_losses_run_in_fp32_on_bf16_autocast_inputs():
    """Queries and keys from a bf16 autocast matmul: the losses come out fp32, equal to fp32 math on those inputs."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 32, generator=g)
    w = torch.randn(32, 64, generator=g) / 6
    queue = torch.nn.functional.normalize(torch.randn(40, 64, generator=g), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k = x @ w, (x + torch.randn(16, 32, generator=g)) @ w
        assert q.dtype == torch.bfloat16
        v2 = infonce_loss(q, k, queue.bfloat16(), 0.07)
        v3 = batch_infonce_loss(q, k, 0.07)
    assert v2.dtype == v3.dtype == torch.float32
    assert float(v2) == pytest.approx(
        _infonce_reference(q.float(), k.float(), queue.bfloat16().float(), 0.07), rel=1e-5
    )
    assert float(v3) == pytest.approx(_batch_infonce_reference(q.float(), k.float(), range(16), 0.07), rel=1e-5)


def _distributed_shuffle_and_v3_loss(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)  # same stream on both ranks; rank 0's permutation is broadcast anyway
    x = torch.arange(8, dtype=torch.float32).view(4, 2) + 100 * rank
    shuffled, undo = batch_shuffle(x)
    restored = batch_unshuffle(shuffled * 2 + 1, undo)  # a per-row function applied on the shuffled batch
    g = torch.Generator().manual_seed(3)
    q_all, k_all = torch.randn(2 * 3, 5, generator=g), torch.randn(2 * 3, 5, generator=g)
    loss = batch_infonce_loss(q_all[rank * 3 : (rank + 1) * 3], k_all[rank * 3 : (rank + 1) * 3], 0.2)
    return {"x": x, "shuffled": shuffled, "restored": restored, "loss": float(loss), "q": q_all, "k": k_all}


def test_shuffle_bn_helpers_and_v3_loss_on_two_gloo_ranks():
    results = run_distributed(_distributed_shuffle_and_v3_loss, 2)
    all_x = torch.cat([r["x"] for r in results])
    all_shuffled = torch.cat([r["shuffled"] for r in results])
    # A permutation of the global batch: every row exactly once, and rows crossed ranks.
    assert sorted(all_shuffled[:, 0].tolist()) == sorted(all_x[:, 0].tolist())
    assert any(row[0] >= 100 for row in results[0]["shuffled"])
    for r in results:
        assert torch.equal(r["restored"], r["x"] * 2 + 1)
    q, k = results[0]["q"], results[0]["k"]
    for rank, r in enumerate(results):  # each rank's anchors against the keys of both ranks
        expected = _batch_infonce_reference(q, k, range(rank * 3, rank * 3 + 3), 0.2)
        assert r["loss"] == pytest.approx(expected, rel=1e-5)


def test_v3_with_a_timm_vit_and_frozen_patch_embedding():
    torch.manual_seed(0)
    model = _moco(
        mode="v3",
        backbone="vit_tiny_patch16_224",
        backbone_kwargs={"patch_size": 4, "depth": 2},
        freeze_patch_embed=True,
        shuffle_bn=False,
    )
    out = model.ssl_step([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)], torch.arange(4))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.features.shape == (4, model.feature_dim)
    assert all(p.grad is None for p in model.backbone.patch_embed.parameters())
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None


def test_conflicting_batch_norm_options_are_rejected():
    with pytest.raises(ValueError, match="shuffle_bn and sync_bn"):
        _moco(mode="v2", shuffle_bn=True, sync_bn=True)


def test_resume_continues_with_the_same_queue_pointer_and_momentum_step(tmp_path):
    import pytorch_lightning as pl

    from sslpipe.data import SSLDataModule

    class RecordStateAtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    class RecordStepsAtBatchEnd(pl.Callback):
        """What a step-wise checkpoint callback (run before the module's own batch-end hook) would save."""

        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append((trainer.global_step, int(pl_module.key_encoder.num_updates)))

    def fit(max_epochs, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        model = _moco(mode="v2", queue_size=50, key_momentum=0.9)
        data = SSLDataModule("digits", image_size=16, batch_size=16, num_workers=0)
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            limit_train_batches=3,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=list(callbacks),
            accelerator="cpu",
        )
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return trainer, model

    at_batch_end = RecordStepsAtBatchEnd()
    trainer, model = fit(1, callbacks=[at_batch_end])
    assert at_batch_end.steps == [(1, 1), (2, 2), (3, 3)]  # the key encoder is updated inside the step
    path = str(tmp_path / "step3.ckpt")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert int(saved["key_encoder.num_updates"]) == 3 and int(saved["queue.ptr"]) == 3 * 16 % 50
    recorder = RecordStateAtStart()
    _, resumed = fit(2, ckpt_path=path, callbacks=[recorder])
    names = ("queue.queue", "queue.ptr", "key_encoder.num_updates", "key_encoder.backbone.conv1.weight")
    for name in (*names, "key_encoder.projector.0.weight"):
        assert torch.equal(recorder.state[name], saved[name]), name
    assert int(resumed.key_encoder.num_updates) == 6 and int(resumed.queue.ptr) == 6 * 16 % 50


@pytest.mark.parametrize("config", ["configs/moco_v2/digits.yaml", "configs/moco_v3/digits.yaml"])
def test_pretrain_then_knn_end_to_end(config, runs_dir):
    # 16 px (the data setting travels with the checkpoint to knn) and one BN group: on 2 CPU cores tiny
    # sub-batches cost more in per-call overhead than in compute (bn_splits is covered by the unit tests).
    run_dir, _ = run_cli(
        [
            "pretrain",
            "--config",
            config,
            "--trainer.default_root_dir",
            runs_dir,
            *TINY,
            "--data.image_size",
            "16",
            "--model.init_args.bn_splits",
            "1",
        ]
    )
    metrics = read_metrics(run_dir)
    mode = "v2" if "v2" in config else "v3"
    assert metrics["method"] == f"moco_{mode}" and metrics["global_step"] == 3
    assert os.path.basename(run_dir).endswith(f"pretrain-moco_{mode}-digits")
    state = torch.load(f"{run_dir}/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert int(state["key_encoder.num_updates"]) == 3
    if "v2" in config:
        assert int(state["queue.ptr"]) == 3 * 32 * 2  # TINY batch 32, three steps, both views (symmetric)
    eval_dir, _ = run_cli(
        [
            "knn",
            "--checkpoint",
            f"{run_dir}/checkpoints/last.ckpt",
            "--trainer.default_root_dir",
            runs_dir,
            "--data.eval_batch_size",
            "256",
        ]
    )
    eval_metrics = read_metrics(eval_dir)
    assert 0 <= eval_metrics["knn_top1"] <= 100 and eval_metrics["method"] == f"moco_{mode}"


def test_key_encoder_moves_once_per_optimiser_step_with_gradient_accumulation():
    import pytorch_lightning as pl

    from sslpipe.data import SSLDataModule

    torch.manual_seed(0)
    model = _moco(mode="v2", queue_size=50, key_momentum=0.9, key_momentum_cosine=True)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=4,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model, SSLDataModule("digits", image_size=16, batch_size=8, num_workers=0))
    assert (
        trainer.global_step == 2 and int(model.key_encoder.num_updates) == 2
    )  # 4 batches, 2 optimiser steps, 2 EMA updates
    assert int(model.queue.ptr) == 4 * 8  # every batch still enqueues its keys
