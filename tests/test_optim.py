"""LARS against a hand-computed update, parameter grouping, optimiser factory, warm-up + cosine schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sslpipe.optim import LARS, build_optimizer, param_groups, warmup_cosine


def _norm(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def test_lars_two_steps_by_hand():
    """SimCLR's LARS: d = g + wd*w; trust = eta*||w||/||d||; v = m*v + trust*d; w -= lr*v.

    Biases (``lars_exclude``) take plain momentum SGD: v = m*v + g; b -= lr*v.
    """
    lr, momentum, wd, eta = 0.5, 0.9, 0.01, 0.02
    w0 = [0.5, -1.0, 2.0, 0.25]
    b0 = [0.3, -0.2]
    grads_w = [[0.1, 0.2, -0.3, 0.05], [-0.2, 0.4, 0.1, 0.3]]
    grads_b = [[1.0, -2.0], [0.5, 0.5]]

    w = nn.Parameter(torch.tensor(w0, dtype=torch.float64).reshape(2, 2))
    b = nn.Parameter(torch.tensor(b0, dtype=torch.float64))
    opt = LARS(
        [{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
        lr=lr,
        momentum=momentum,
        eta=eta,
    )

    ew, eb = list(w0), list(b0)  # expected values, plain Python
    vw, vb = [0.0] * 4, [0.0] * 2
    for gw, gb in zip(grads_w, grads_b):
        w.grad = torch.tensor(gw, dtype=torch.float64).reshape(2, 2)
        b.grad = torch.tensor(gb, dtype=torch.float64)
        opt.step()

        d = [g + wd * x for g, x in zip(gw, ew)]
        trust = eta * _norm(ew) / _norm(d)
        vw = [momentum * v + trust * di for v, di in zip(vw, d)]
        ew = [x - lr * v for x, v in zip(ew, vw)]
        vb = [momentum * v + g for v, g in zip(vb, gb)]
        eb = [x - lr * v for x, v in zip(eb, vb)]

        assert w.detach().flatten().tolist() == pytest.approx(ew, rel=1e-6)
        assert b.detach().tolist() == pytest.approx(eb, rel=1e-12)
    # the trust ratio really shrank the weight's step far below plain SGD's
    assert abs(ew[0] - w0[0]) < 0.1 * lr * abs(grads_w[0][0])


def test_lars_excluded_group_is_plain_sgd_with_its_weight_decay():
    c = nn.Parameter(torch.tensor([1.0, -3.0]))
    opt = LARS([{"params": [c], "weight_decay": 0.1, "lars_exclude": True}], lr=0.2, momentum=0.0)
    c.grad = torch.tensor([0.5, 0.5])
    opt.step()
    assert c.detach().tolist() == pytest.approx([1.0 - 0.2 * (0.5 + 0.1), -3.0 - 0.2 * (0.5 - 0.3)])


def test_lars_zero_weight_uses_trust_one():
    """A zero-initialised layer has ||w|| = 0: LARS falls back to the plain gradient step, not a zero step."""
    z = nn.Parameter(torch.zeros(3))
    opt = LARS([z], lr=0.1, momentum=0.9, eta=0.001)
    z.grad = torch.tensor([1.0, 2.0, -1.0])
    opt.step()
    assert z.detach().tolist() == pytest.approx([-0.1, -0.2, 0.1])


def test_lars_rejects_negative_lr():
    with pytest.raises(ValueError, match="lr"):
        LARS([nn.Parameter(torch.zeros(1))], lr=-1.0)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.probe = nn.Linear(4, 3)


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_param_groups_split():
    net = _Net()
    groups = param_groups(net, weight_decay=0.05, prefix_excluded=("probe.",))
    assert len(groups) == 2
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and decay["lars_exclude"] is False
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"] is True
    assert _ids(decay["params"]) == _ids([net.conv.weight, net.fc.weight])
    assert _ids(no_decay["params"]) == _ids([net.conv.bias, net.bn.weight, net.bn.bias, net.fc.bias, net.pos_embed])

    everything = param_groups(net, weight_decay=0.05, exclude_bias_norm=False)
    assert len(everything) == 1
    expected = [p for name, p in net.named_parameters() if p.requires_grad]  # probe included this time
    assert _ids(everything[0]["params"]) == _ids(expected)


def test_build_optimizer():
    net = _Net()
    sgd = build_optimizer("sgd", param_groups(net, 0.1), lr=0.3, momentum=0.8)
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 0.3 and g["momentum"] == 0.8 for g in sgd.param_groups)
    adamw = build_optimizer("adamw", param_groups(net, 0.1), lr=1e-3, betas=(0.9, 0.95))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.9, 0.95)
    lars = build_optimizer("lars", param_groups(net, 0.1), lr=0.3)
    assert isinstance(lars, LARS) and [g["lars_exclude"] for g in lars.param_groups] == [False, True]
    with pytest.raises(ValueError, match="'lamb'"):
        build_optimizer("lamb", param_groups(net, 0.1), lr=0.3)  # type: ignore[arg-type]


def test_warmup_cosine_values():
    # warm-up over 4 steps: (step + 1) / 4
    assert [warmup_cosine(s, 4, 12) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # cosine over the remaining 8 steps: 0.5 * (1 + cos(pi * (step - 4) / 8))
    assert warmup_cosine(4, 4, 12) == pytest.approx(1.0)
    assert warmup_cosine(6, 4, 12) == pytest.approx(0.8535533905932737)  # (1 + 1/sqrt(2)) / 2
    assert warmup_cosine(8, 4, 12) == pytest.approx(0.5)
    assert warmup_cosine(12, 4, 12) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(20, 4, 12) == pytest.approx(0.0, abs=1e-12)  # clamped after the end
    # a floor: final + (1 - final) * cosine
    assert warmup_cosine(8, 4, 12, final_ratio=0.1) == pytest.approx(0.55)
    assert warmup_cosine(12, 4, 12, final_ratio=0.1) == pytest.approx(0.1)
    # no warm-up starts at the full rate
    assert warmup_cosine(0, 0, 10) == pytest.approx(1.0)
    values = [warmup_cosine(s, 4, 12) for s in range(3, 13)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # non-increasing after warm-up


def test_warmup_counts_epochs_in_loader_steps_when_max_steps_ends_training():
    """warmup_epochs is measured in the loader's steps per epoch, also when max_steps, not max_epochs, ends the run."""
    import pytorch_lightning as pl

    from sslpipe.data import SSLDataModule
    from sslpipe.methods import SimCLR

    class RecordLR(pl.Callback):
        def __init__(self):
            self.lrs = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    torch.manual_seed(0)
    model = SimCLR(
        backbone="resnet18",
        image_size=16,
        proj_hidden_dim=16,
        proj_output_dim=8,
        optimizer="sgd",
        base_lr=0.256,
        warmup_epochs=1.0,
        online_probe=False,
    )
    data = SSLDataModule("fake", image_size=16, batch_size=8, num_workers=0)
    recorder = RecordLR()
    trainer = pl.Trainer(
        max_epochs=1000,
        max_steps=6,
        limit_train_batches=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        accelerator="cpu",
    )
    trainer.fit(model, data)
    peak = 0.256 * 8 / 256  # base_lr x batch / 256
    warmup, total = 4, 6  # one epoch = 4 loader steps; training ends at max_steps = 6
    expected = [
        peak * (s + 1) / warmup
        if s < warmup
        else peak * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        for s in range(total)
    ]
    assert recorder.lrs == pytest.approx(expected, rel=1e-6)


def test_an_endless_run_is_rejected_with_the_fix():
    import pytorch_lightning as pl

    from sslpipe.data import SSLDataModule
    from sslpipe.methods import SimCLR

    model = SimCLR(backbone="resnet18", image_size=16, proj_hidden_dim=16, proj_output_dim=8, online_probe=False)
    trainer = pl.Trainer(
        max_epochs=-1,
        max_steps=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with pytest.raises(ValueError, match="trainer.max_epochs or trainer.max_steps"):
        trainer.fit(model, SSLDataModule("fake", image_size=16, batch_size=8, num_workers=0))


# ---------------------------------------------------------------------------------------------- foreach LARS
def _reference_lars_step(params_and_groups, states: dict) -> None:
    """The per-parameter LARS update written out (the implementation before the foreach rewrite)."""
    for group in params_and_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            if group["weight_decay"] != 0:
                g = g + group["weight_decay"] * p
            if not group["lars_exclude"]:
                w_norm, g_norm = p.norm(), g.norm()
                trust = group["eta"] * w_norm / (g_norm + group["eps"]) if w_norm > 0 and g_norm > 0 else 1.0
                g = g * trust
            if id(p) not in states:
                states[id(p)] = g.clone()
            else:
                states[id(p)] = group["momentum"] * states[id(p)] + g
            p.sub_(group["lr"] * states[id(p)])


def _lars_problem(dtype: torch.dtype):
    """Parameters of mixed shapes in a decayed LARS group and an excluded group, one zero tensor, one without grad."""
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (3, 2, 2, 2), (7,), (4, 4)]
    params = [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]
    params[3].data.zero_()  # ||w|| = 0: trust falls back to 1
    groups = [
        {"params": [params[0], params[2], params[3], params[4]], "weight_decay": 0.05, "lars_exclude": False},
        {"params": [params[1]], "weight_decay": 0.0, "lars_exclude": True},
    ]
    return params, groups


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lars_foreach_and_loop_match_the_per_parameter_reference(foreach, dtype):
    params, groups = _lars_problem(dtype)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    index = {id(p): i for i, p in enumerate(params)}
    hyper = dict(lr=0.7, momentum=0.9, eta=0.02, eps=1e-8)
    opt = LARS(groups, foreach=foreach, **hyper)
    ref_groups = [{**hyper, **{k: v for k, v in grp.items() if k != "params"}} for grp in groups]
    for ref, grp in zip(ref_groups, groups):
        ref["params"] = [ref_params[index[id(p)]] for p in grp["params"]]
    states: dict = {}
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        for i, (p, r) in enumerate(zip(params, ref_params)):
            if i == 4 and step < 2:  # no gradient for two steps (a frozen-then-thawed layer): no update, no state
                p.grad = r.grad = None
                continue
            grad = torch.randn(p.shape, generator=g, dtype=dtype)
            p.grad, r.grad = grad.clone(), grad.clone()
        grads_before = [None if p.grad is None else p.grad.clone() for p in params]
        opt.step()
        with torch.no_grad():
            _reference_lars_step(ref_groups, states)
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
        for p, before in zip(params, grads_before):  # the update must not write into the gradients
            assert (p.grad is None and before is None) or torch.equal(p.grad, before)
    assert len(opt.state) == len(params)  # the late parameter got its state on its first gradient


def test_lars_state_is_interchangeable_between_foreach_and_loop():
    """A checkpoint of the foreach form resumes in the loop form (same state layout) and continues identically."""
    params, groups = _lars_problem(torch.float32)
    index = {id(p): i for i, p in enumerate(params)}
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    copy_groups = [{**grp, "params": [copies[index[id(p)]] for p in grp["params"]]} for grp in groups]
    fast = LARS(groups, lr=0.3, foreach=True)
    for p in params:
        p.grad = torch.ones_like(p)
    fast.step()
    resumed = LARS(copy_groups, lr=0.3, foreach=False)
    resumed.load_state_dict(copy.deepcopy(fast.state_dict()))  # as if read back from a file
    for p, q in zip(params, copies):
        q.data.copy_(p.data)
        p.grad, q.grad = torch.full_like(p, -0.5), torch.full_like(q, -0.5)
    fast.step()
    resumed.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_optimisers_loop_on_cpu_and_fuse_or_foreach_on_cuda():
    net = nn.Linear(3, 2)
    for name in ("sgd", "adamw"):
        opt = build_optimizer(name, param_groups(net, 0.1), lr=0.1)
        assert opt.defaults["foreach"] is False and not opt.defaults["fused"]
    assert build_optimizer("lars", param_groups(net, 0.1), lr=0.1).foreach is False
    if torch.cuda.is_available():
        net = net.cuda()
        for name in ("sgd", "adamw"):
            opt = build_optimizer(name, param_groups(net, 0.1), lr=0.1)
            assert opt.defaults["fused"] is True and not opt.defaults["foreach"]
        assert build_optimizer("lars", param_groups(net, 0.1), lr=0.1).foreach is True
