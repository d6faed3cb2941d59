"""The batched linear-probe sweep against plain one-probe-at-a-time training, its choice, and the augmented probe."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.evaluation.linear import (
    FrozenEncoder,
    LinearProbes,
    augmented_train_loader,
    fit_linear_probes,
    train_linear_probe,
    train_probes,
)
from tests.checkpoints import perturb_, save_method_checkpoint
from tests.helpers import read_metrics, run_cli


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second OpenMP thread only adds wake-up latency (tens of ms per op on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Different learning rates AND weight decays per probe, so a probe using another's lr or wd shows.
PAIRS = [(0.05, 0.0), (0.5, 0.1), (2.0, 0.01), (0.5, 0.0)]


def _data(n: int = 90, d: int = 6, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, d, generator=g)[y] + torch.randn(n, d, generator=g) + 3.0
    return x, y


def _standardised(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return ((x - x.mean(0)) / x.std(0)).float()


def sequential_probe(xs, y, classes, lr, wd, epochs, batch_size, seed, rows=None, use_row=None) -> nn.Linear:
    """The reference: one nn.Linear (zero init) and torch.optim.SGD (momentum 0.9, decay on the weight only).

    Learning rate ``lr * (1 + cos(pi * step / total)) / 2`` per step; mini-batches
    ``rows[randperm(len(rows), generator)]`` sliced by ``batch_size``; ``use_row(batch_rows)`` (bool) restricts
    the loss to some rows of each batch (mean over them).
    """
    rows = torch.arange(len(xs)) if rows is None else rows
    head = nn.Linear(xs.shape[1], classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(
        [{"params": [head.weight], "weight_decay": wd}, {"params": [head.bias], "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
    )
    total = epochs * math.ceil(len(rows) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = rows[torch.randperm(len(rows), generator=g)]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            keep = torch.ones(len(idx), dtype=torch.bool) if use_row is None else use_row(idx)
            losses = F.cross_entropy(head(xs[idx]), y[idx], reduction="none")
            loss = (losses * keep).sum() / max(1, int(keep.sum()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_probes_equal_sequential_sgd(dtype):
    x, y = _data()
    x = x.to(dtype)  # fp16 as in the feature cache: the probes upcast per batch
    lrs, wds = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    probes = fit_linear_probes(x, y, 4, lrs, wds, epochs=3, batch_size=32, seed=5)  # 90 rows: last batch of 26
    xs = _standardised(x.float())
    for p, (lr, wd) in enumerate(PAIRS):
        ref = sequential_probe(xs, y, 4, lr, wd, epochs=3, batch_size=32, seed=5)
        got = probes.probe(p)
        torch.testing.assert_close(got.weight, ref.weight, rtol=1e-4, atol=1e-5, msg=f"probe {p} weight")
        torch.testing.assert_close(got.bias, ref.bias, rtol=1e-4, atol=1e-5, msg=f"probe {p} bias")


def test_batched_probes_on_a_subset_of_rows():
    x, y = _data(n=70, seed=1)
    rows = torch.arange(70)[torch.arange(70) % 3 != 0]
    probes = fit_linear_probes(x, y, 4, [0.3, 1.0], [0.01, 0.0], epochs=2, batch_size=16, seed=2, rows=rows)
    xs = _standardised(x)
    for p, (lr, wd) in enumerate([(0.3, 0.01), (1.0, 0.0)]):
        ref = sequential_probe(xs, y, 4, lr, wd, epochs=2, batch_size=16, seed=2, rows=rows)
        torch.testing.assert_close(probes.probe(p).weight, ref.weight, rtol=1e-4, atol=1e-5)


def test_row_weights_restrict_each_probes_loss():
    """The augmented protocol's masks: sweep probes learn only from their rows of each batch, final ones from all."""
    x, y = _data(n=64, seed=2)
    xs = _standardised(x)
    in_fit = torch.rand(64, generator=torch.Generator().manual_seed(3)) > 0.3
    probes = LinearProbes(*_moments(x), 4, [0.5, 0.5, 1.0], [0.01, 0.01, 0.0])
    g = torch.Generator().manual_seed(4)

    def batches(epoch):
        order = torch.randperm(64, generator=g)
        for start in range(0, 64, 16):
            idx = order[start : start + 16]
            yield x[idx], y[idx], torch.stack([in_fit[idx], torch.ones(16, dtype=torch.bool), in_fit[idx]], 1)

    train_probes(probes, 2, batches, 4)
    refs = [
        sequential_probe(xs, y, 4, 0.5, 0.01, 2, 16, 4, use_row=lambda idx: in_fit[idx]),
        sequential_probe(xs, y, 4, 0.5, 0.01, 2, 16, 4),
        sequential_probe(xs, y, 4, 1.0, 0.0, 2, 16, 4, use_row=lambda idx: in_fit[idx]),
    ]
    for p, ref in enumerate(refs):
        torch.testing.assert_close(probes.probe(p).weight, ref.weight, rtol=1e-4, atol=1e-5, msg=f"probe {p}")
        torch.testing.assert_close(probes.probe(p).bias, ref.bias, rtol=1e-4, atol=1e-5, msg=f"probe {p}")
    assert not torch.allclose(probes.probe(0).weight, probes.probe(1).weight)  # the mask mattered


def _moments(x):
    return x.double().mean(0).float(), x.double().std(0).float()


# ------------------------------------------------------------------ choosing on held-out training data
def _shortcut_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes a nearest-centroid rule separates poorly (~60%) and a fitted linear probe perfectly.

    x0 = 0.3 y' + z, x1 = z with shared noise z: the class means differ only along x0, but x0 - x1 is the
    label. Heavy weight decay (or a tiny step) leaves the probe near the centroid rule; a free probe finds x0 - x1.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    z = 2 * torch.randn(n, generator=g)
    x = torch.stack([0.6 * y - 0.3 + z, z, torch.randn(n, generator=g)], 1)
    return x, y


SWEEP = dict(num_classes=2, lrs=(0.001, 0.5), weight_decays=(0.0, 3.0), epochs=10, batch_size=100, seed=0)


def test_sweep_is_scored_on_held_out_training_rows_and_the_best_is_chosen():
    xtr, ytr = _shortcut_data(300, 0)
    xva, yva = _shortcut_data(200, 1)
    result = train_linear_probe(xtr, ytr, xva, yva, holdout_fraction=0.25, **SWEEP)
    # The held-out rows (a seeded permutation's first 25%) and what each pair scores there, computed apart:
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    hold, fit = perm[:75], perm[75:]
    xs = (xtr - xtr.mean(0)) / xtr.std(0)
    expected = []
    for lr in SWEEP["lrs"]:
        for wd in SWEEP["weight_decays"]:
            ref = sequential_probe(xs, ytr, 2, lr, wd, SWEEP["epochs"], SWEEP["batch_size"], 0, rows=fit)
            with torch.no_grad():
                expected.append(100 * (ref(xs[hold]).argmax(1) == ytr[hold]).float().mean().item())
    assert [(s["lr"], s["weight_decay"]) for s in result.sweep] == [(0.001, 0.0), (0.001, 3.0), (0.5, 0.0), (0.5, 3.0)]
    assert [s["holdout_top1"] for s in result.sweep] == pytest.approx(expected, abs=1e-3)
    assert (result.lr, result.weight_decay) == (0.5, 0.0)  # the only setting that escapes the centroid rule
    assert expected[2] >= 95 and max(expected[:2] + expected[3:]) <= 80
    assert result.top1 >= 95


def test_validation_labels_play_no_part_in_the_choice():
    xtr, ytr = _shortcut_data(300, 2)
    xva, yva = _shortcut_data(100, 3)
    result = train_linear_probe(xtr, ytr, xva, yva, **SWEEP)
    # Validation labels scrambled: were val used to choose, the wrong setting would now win.
    flipped = train_linear_probe(xtr, ytr, xva, 1 - yva, **SWEEP)
    assert flipped.sweep == result.sweep
    assert (flipped.lr, flipped.weight_decay) == (result.lr, result.weight_decay) == (0.5, 0.0)
    assert flipped.top1 == pytest.approx(100 - result.top1)


# ------------------------------------------------------------------ the augmented probe
def _tiny_bn_backbone() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
    )
    return perturb_(net)


def _digits(image_size: int = 16):
    from sslpipe.data import SSLDataModule

    return SSLDataModule(dataset="digits", image_size=image_size, batch_size=64, num_workers=0)


def test_augmented_loader_crops_and_flips_only_when_asked():
    data = _digits()
    plain = data.get_dataset("train", data.eval_transform())
    for hflip in (True, False):
        # crop_scale (1, 1) crops the whole (square) digit, so each image is the eval image, maybe mirrored.
        images, _, idx = next(iter(augmented_train_loader(data, 64, (1.0, 1.0), hflip, seed=0)))
        mirrored = []
        for image, i in zip(images, idx.tolist()):
            ref = plain[i][0]
            same, flipped = torch.allclose(image, ref, atol=1e-5), torch.allclose(image, ref.flip(-1), atol=1e-5)
            assert same or flipped
            mirrored.append(flipped and not same)
        assert any(mirrored) == hflip
    # and the default scale range crops: most images differ from their eval image
    images, _, idx = next(iter(augmented_train_loader(data, 32, (0.08, 1.0), False, seed=0)))
    differ = [not torch.allclose(image, plain[i][0], atol=1e-5) for image, i in zip(images, idx.tolist())]
    assert sum(differ) > 24


def test_augmented_probe_on_digits_leaves_the_backbone_untouched():
    from sslpipe.evaluation.features import extract_features

    data = _digits()
    model = _tiny_bn_backbone().train()  # train mode on purpose: the probe must switch it to eval itself
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xtr, ytr = extract_features(model, data.eval_dataloader("train"))
    xva, yva = extract_features(model, data.eval_dataloader("val"))
    result = train_linear_probe(
        xtr, ytr, xva, yva, 10, lrs=(0.1, 1.0), weight_decays=(0.0,), epochs=2, batch_size=128,
        augment=True, augment_hflip=False, augment_crop_scale=(0.5, 1.0), encoder=FrozenEncoder(model, data),
    )  # fmt: skip
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # weights and BatchNorm running statistics (and num_batches_tracked) unchanged
        assert torch.equal(before[k], after[k]), k
    assert model.training  # mode restored
    assert [s["lr"] for s in result.sweep] == [0.1, 1.0]
    assert 20.0 < result.top1 <= result.top5 <= 100.0  # 10 classes: chance is 10%


def test_augmented_probe_needs_an_encoder():
    x, y = _data(n=20)
    with pytest.raises(ValueError, match="encoder"):
        train_linear_probe(x, y, x, y, 4, augment=True)


def test_linear_command_with_augmentation(tmp_path):
    """``sslpipe linear --linear.augment true`` end to end on a (constructed) digits checkpoint."""
    from sslpipe.methods import SimCLR

    method = perturb_(SimCLR(backbone="resnet10t", image_size=8, proj_hidden_dim=16, proj_output_dim=8))
    os.makedirs(tmp_path / "run" / "checkpoints")
    ckpt = save_method_checkpoint(method, str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    run_dir, out = run_cli(
        [
            "linear", "--checkpoint", ckpt, "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--data.num_workers", "0", "--data.eval_batch_size", "512", "--trainer.precision", "32-true",
            "--linear.augment", "true", "--linear.augment_hflip", "false", "--linear.epochs", "1",
            "--linear.batch_size", "256", "--linear.lrs", "[0.5]", "--linear.weight_decays", "[0.0, 0.001]",
        ]
    )  # fmt: skip
    metrics = read_metrics(run_dir)
    assert metrics["linear_augment"] is True
    assert [(s["lr"], s["weight_decay"]) for s in metrics["linear_sweep"]] == [(0.5, 0.0), (0.5, 0.001)]
    assert 0.0 <= metrics["linear_top1"] <= metrics["linear_top5"] <= 100.0
    cached = [f for f in os.listdir(tmp_path / "run" / "features") if f.endswith(".pt")]
    assert len(cached) == 2  # centre-crop train and val features (standardisation, held-out and val scores)


def test_bench_probe_runs_at_a_tiny_size():
    """scripts/bench_probe.py works end to end (its timings are only meaningful on an idle machine)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_probe.py")
    spec = importlib.util.spec_from_file_location("bench_probe", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.run(n=200, d=8, classes=3, probes=3, epochs=1, device="cpu", batch_size=64)
    assert set(out) == {"batched_s", "sequential_s", "ratio", "settings"}
    assert out["batched_s"] > 0 and out["ratio"] == pytest.approx(out["sequential_s"] / out["batched_s"])
    assert out["settings"]["probes"] == 3
