"""Evaluation: kNN vs brute force, top-k, the linear probe's hold-out sweep, the feature cache, diagnostics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sslpipe.evaluation import (
    cached_features,
    extract_features,
    knn_classify,
    knn_predict,
    topk_accuracy,
    train_linear_probe,
)
from sslpipe.evaluation.diagnostics import alignment, contrastive_energies, effective_rank, uniformity
from sslpipe.evaluation.features import cache_key


# ------------------------------------------------------------------ kNN
def knn_brute_force(bank, bank_labels, queries, num_classes, k, t):
    """Cosine similarity to every bank sample, the k largest, each voting exp(s/T) for its class."""
    scores = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    b = bank.double() / bank.double().norm(dim=1, keepdim=True)
    for qi, q in enumerate(queries.double()):
        sims = b @ (q / q.norm())
        top = torch.topk(sims, k).indices
        for j in top.tolist():
            scores[qi, int(bank_labels[j])] += math.exp(sims[j].item() / t)
    return scores


@pytest.mark.parametrize("k,t", [(1, 0.07), (5, 0.07), (7, 0.5)])
def test_knn_predict_matches_brute_force(k, t):
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(60, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    queries = torch.randn(9, 8, generator=g) * 3  # norms must not matter
    got = knn_predict(bank, labels, queries, num_classes=4, k=k, temperature=t)
    expected = knn_brute_force(bank, labels, queries, 4, k, t)
    assert got.shape == (9, 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_knn_k_larger_than_bank_and_errors():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    got = knn_predict(bank, labels, torch.tensor([[1.0, 0.0]]), num_classes=2, k=10, temperature=1.0)
    expected = [math.exp(1.0), math.exp(0.0) + math.exp(1 / math.sqrt(2))]
    assert got[0].tolist() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_predict(bank, labels, bank, 2, k=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(bank, labels, bank, 2, temperature=0.0)


def test_knn_classify_on_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(5) * 10
    train_y = torch.arange(50) % 5
    val_y = torch.arange(20) % 5
    train_x = centres[train_y] + torch.randn(50, 5, generator=g)
    val_x = centres[val_y] + torch.randn(20, 5, generator=g)
    out = knn_classify(train_x, train_y, val_x, val_y, num_classes=5, k=5)
    assert out == {"knn_top1": pytest.approx(100.0), "knn_top5": pytest.approx(100.0)}


# ------------------------------------------------------------------ top-k
def test_topk_accuracy_by_hand():
    scores = torch.tensor(
        [
            [0.1, 0.7, 0.2],  # label 1: top-1 hit
            [0.5, 0.3, 0.2],  # label 1: second best -> top-2 hit only
            [0.2, 0.3, 0.5],  # label 0: last -> miss at k=1, 2; hit at k=3
            [0.9, 0.05, 0.05],  # label 0: top-1 hit
        ]
    )
    labels = torch.tensor([1, 1, 0, 0])
    acc = topk_accuracy(scores, labels, (1, 2, 3, 5))
    assert acc[1] == pytest.approx(0.5)
    assert acc[2] == pytest.approx(0.75)
    assert acc[3] == pytest.approx(1.0)
    assert acc[5] == pytest.approx(1.0)  # k capped at the number of classes


# ------------------------------------------------------------------ linear probe
def _separable(n: int, seed: int, dim: int = 10, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes separated along fixed directions (with a constant offset the standardisation removes)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    directions = torch.eye(dim)[:classes] * 4
    x = directions[y] + 0.5 * torch.randn(n, dim, generator=g) + 7.0
    return x, y


def test_linear_probe_separable_and_holdout_selection():
    xtr, ytr = _separable(200, 0)
    xva, yva = _separable(90, 1)
    kwargs = dict(num_classes=3, lrs=(0.001, 0.1), weight_decays=(0.0, 0.5), epochs=5, batch_size=100)
    result = train_linear_probe(xtr, ytr, xva, yva, **kwargs)
    assert result.top1 >= 95.0 and result.top5 == pytest.approx(100.0)

    # every grid point was scored on the hold-out, and the chosen one is the best there
    assert [(s["lr"], s["weight_decay"]) for s in result.sweep] == [(0.001, 0.0), (0.001, 0.5), (0.1, 0.0), (0.1, 0.5)]
    best = max(result.sweep, key=lambda s: s["holdout_top1"])
    assert (result.lr, result.weight_decay) == (best["lr"], best["weight_decay"])

    # deterministic
    again = train_linear_probe(xtr, ytr, xva, yva, **kwargs)
    assert again.sweep == result.sweep
    assert (again.top1, again.lr, again.weight_decay) == (result.top1, result.lr, result.weight_decay)

    # the validation split plays no part in the choice: scrambled validation labels change the
    # reported accuracy, never the sweep or the chosen hyper-parameters
    scrambled = train_linear_probe(xtr, ytr, xva, (yva + 1) % 3, **kwargs)
    assert scrambled.sweep == result.sweep
    assert (scrambled.lr, scrambled.weight_decay) == (result.lr, result.weight_decay)
    assert scrambled.top1 <= 5.0


def test_linear_probe_single_pair_skips_sweep_and_ignores_unlabelled():
    xtr, ytr = _separable(120, 2)
    ytr = ytr.clone()
    ytr[::4] = -1  # STL-10's unlabeled images
    xva, yva = _separable(30, 3)
    result = train_linear_probe(
        xtr, ytr, xva, yva, num_classes=3, lrs=(0.1,), weight_decays=(0.0,), epochs=3, batch_size=32
    )
    assert result.sweep == [] and (result.lr, result.weight_decay) == (0.1, 0.0)
    assert result.top1 >= 90.0
    with pytest.raises(ValueError, match="holdout_fraction"):
        train_linear_probe(xtr, ytr, xva, yva, num_classes=3, holdout_fraction=1.0)


# ------------------------------------------------------------------ features and the cache
def test_extract_features_eval_mode_and_values():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.Dropout(0.9))
    model.train()
    images, labels = torch.randn(10, 3, 2, 2), torch.arange(10)
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    feats, ys = extract_features(model, loader)
    assert model.training  # mode restored
    assert feats.dtype == torch.float32 and feats.shape == (10, 4)
    with torch.no_grad():
        expected = images.flatten(1) @ model[1].weight.T + model[1].bias  # dropout off in eval mode
    torch.testing.assert_close(feats, expected)
    assert ys.tolist() == list(range(10))


def test_feature_cache_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(5, 3), torch.arange(5)

    key = cache_key(checkpoint="a.ckpt", split="train")
    first = cached_features(str(tmp_path / "cache"), key, compute)
    second = cached_features(str(tmp_path / "cache"), key, compute)
    assert len(calls) == 1
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # another key (another split / checkpoint) is another entry
    cached_features(str(tmp_path / "cache"), cache_key(checkpoint="a.ckpt", split="val"), compute)
    assert len(calls) == 2
    # no cache folder: always recompute
    cached_features(None, key, compute)
    cached_features(None, key, compute)
    assert len(calls) == 4


def test_cache_key_stable_and_sensitive():
    assert cache_key(a=1, b="x") == cache_key(b="x", a=1)
    assert cache_key(a=1, b="x") != cache_key(a=2, b="x")


# ------------------------------------------------------------------ diagnostics
def test_contrastive_energies_by_hand():
    z1 = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    z2 = torch.tensor([[1.0, 1.0], [0.0, -5.0]])
    # unit vectors: a0=(1,0) a1=(0,1); b0=(1,1)/sqrt2 b1=(0,-1)
    # positives: a0.b0 = 1/sqrt2, a1.b1 = -1; negatives: a0.b1 = 0, a1.b0 = 1/sqrt2
    r = 1 / math.sqrt(2)
    pos, neg = (r - 1) / 2, (0 + r) / 2
    e = contrastive_energies(z1, z2)
    assert e["energy_pos"].item() == pytest.approx(-pos)
    assert e["energy_neg"].item() == pytest.approx(-neg)
    assert e["energy_gap"].item() == pytest.approx(pos - neg)


def test_alignment_and_uniformity_by_hand():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # ||(1,0)-(0,1)||^2 = 2 and ||(0,1)-(0,1)||^2 = 0
    assert alignment(z1, z2).item() == pytest.approx(1.0)
    # three unit vectors 120 degrees apart: every pairwise squared distance is 3
    pts = torch.tensor([[1.0, 0.0], [-0.5, math.sqrt(3) / 2], [-0.5, -math.sqrt(3) / 2]])
    assert uniformity(pts).item() == pytest.approx(-2 * 3.0, rel=1e-5)


def test_effective_rank():
    g = torch.Generator().manual_seed(0)
    d = 16
    isotropic = torch.randn(4000, d, generator=g)
    assert d - 0.5 < effective_rank(isotropic).item() <= d + 1e-3
    rank_one = torch.randn(4000, 1, generator=g) * torch.randn(1, d, generator=g)
    assert effective_rank(rank_one).item() == pytest.approx(1.0, abs=1e-3)
    rank_four = torch.randn(4000, 4, generator=g) @ torch.linalg.qr(torch.randn(d, 4, generator=g))[0].T
    assert effective_rank(rank_four).item() == pytest.approx(4.0, abs=0.2)
