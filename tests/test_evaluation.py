"""Evaluation: kNN (chunked torch and faiss) vs brute force, top-k, the linear probe's hold-out sweep, fp16 feature
extraction (sharded over gloo ranks), the content-hashed feature cache, diagnostics."""

from __future__ import annotations

import math
import os

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
from sslpipe.evaluation.features import cache_key, feature_cache_key, file_digest
from sslpipe.evaluation.knn import knn_search_faiss, knn_search_torch
from tests.helpers import run_distributed


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


# (backend, query_chunk, bank_chunk): chunks far smaller than the data, so top-k lists merge across bank chunks
# (k=12 exceeds a bank chunk of 7) and queries come in several chunks with a ragged last one.
SEARCHES = [("faiss", 4096, 65536), ("torch", 4096, 65536), ("torch", 4, 7), ("torch", 2, 13)]


@pytest.mark.parametrize("backend,query_chunk,bank_chunk", SEARCHES)
@pytest.mark.parametrize("k,t", [(1, 0.07), (5, 0.07), (12, 0.5)])
def test_knn_predict_matches_brute_force(k, t, backend, query_chunk, bank_chunk):
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(60, 8, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    queries = torch.randn(9, 8, generator=g) * 3  # norms must not matter
    got = knn_predict(bank, labels, queries, 4, k, t, backend=backend, query_chunk=query_chunk, bank_chunk=bank_chunk)
    expected = knn_brute_force(bank, labels, queries, 4, k, t)
    assert got.shape == (9, 4)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_knn_torch_search_equals_faiss_on_fp16_features():
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(500, 32, generator=g).half()  # the feature cache's dtype
    queries = torch.randn(37, 32, generator=g).half()
    sims_t, idx_t = knn_search_torch(bank, queries, k=20, query_chunk=8, bank_chunk=64)
    sims_f, idx_f = knn_search_faiss(bank, queries, k=20, chunk=100)
    assert torch.equal(idx_t, idx_f)
    torch.testing.assert_close(sims_t, sims_f, rtol=1e-5, atol=1e-6)


def test_knn_ties_across_bank_chunks():
    """Exact duplicates in different bank chunks: both vote when k covers them; at the k-th place the earlier wins."""
    g = torch.Generator().manual_seed(4)
    bank = torch.randn(21, 5, generator=g)
    bank[9] = bank[2]  # same offset (2) in chunks 0 and 1 of 7 rows: bitwise-equal similarities
    bank[16] = bank[2]  # and in chunk 2
    labels = torch.arange(21) % 3
    labels[2], labels[9], labels[16] = 0, 1, 2
    query = (bank[2] + 0.01 * torch.randn(5, generator=g))[None]

    def expected(k):
        """Brute force in float64, ties broken by the lower bank index (a stable sort)."""
        b = bank.double() / bank.double().norm(dim=1, keepdim=True)
        q = query[0].double() / query[0].double().norm()
        sims = (b @ q).tolist()
        top = sorted(range(21), key=lambda j: (-sims[j], j))[:k]
        scores = torch.zeros(3, dtype=torch.float64)
        for j in top:
            scores[int(labels[j])] += math.exp(sims[j] / 0.1)
        return scores

    for k in (1, 2, 3, 4):
        _, idx = knn_search_torch(bank, query, k, bank_chunk=7)
        assert idx[0, : min(k, 3)].tolist() == [2, 9, 16][: min(k, 3)]
        got = knn_predict(bank, labels, query, 3, k, 0.1, backend="torch", bank_chunk=7)
        torch.testing.assert_close(got[0].double(), expected(k), rtol=1e-4, atol=1e-6)


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
    with pytest.raises(ValueError, match="backend"):
        knn_predict(bank, labels, bank, 2, backend="annoy")  # type: ignore[arg-type]
    torch_path = knn_predict(bank, labels, torch.tensor([[1.0, 0.0]]), 2, k=10, temperature=1.0, backend="torch")
    assert torch_path[0].tolist() == pytest.approx(expected, rel=1e-5)


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
    assert feats.dtype == torch.float16 and feats.shape == (10, 4)  # halves the cache; probes upcast per batch
    assert ys.dtype == torch.int32
    with torch.no_grad():
        expected = images.flatten(1) @ model[1].weight.T + model[1].bias  # dropout off in eval mode
    torch.testing.assert_close(feats.float(), expected, rtol=1e-3, atol=1e-3)  # fp16 rounding
    assert ys.tolist() == list(range(10))
    full, _ = extract_features(model, loader, dtype=torch.float32)
    torch.testing.assert_close(full, expected)


def test_extract_features_beyond_fp16_range_stay_fp32():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images = torch.randn(8, 3, 2, 2)
    images[5] *= 1e6  # one batch far past fp16's 65504
    loader = DataLoader(TensorDataset(images, torch.zeros(8, dtype=torch.long)), batch_size=3)
    with pytest.warns(UserWarning, match="fp16 range"):
        feats, _ = extract_features(model, loader)
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
    with torch.no_grad():
        torch.testing.assert_close(feats, model(images), rtol=1e-3, atol=1e-2)


# ------------------------------------------------------------------ extraction sharded over ranks
N_IMAGES = 11  # odd: the two shards differ in size (6 and 5), so padding/ordering mistakes show


def _extraction_inputs():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        model[1].running_mean.normal_(generator=g)
    dataset = TensorDataset(torch.randn(N_IMAGES, 3, 5, 5, generator=g), torch.arange(N_IMAGES) * 7 % 5)
    return model, DataLoader(dataset, batch_size=2)


def _sharded_worker(rank: int, world: int, cache_dir: str) -> dict:
    import torch.distributed as dist

    model, loader = _extraction_inputs()
    seen = []
    model.register_forward_hook(lambda m, inp, out: seen.append(inp[0][:, 0, 0, 0].clone()))
    to_all = extract_features(model, loader, dst=None)
    n_seen = len(torch.cat(seen))
    to_rank0 = extract_features(model, loader)  # default: rank 0 receives, the others get empty tensors
    calls = []

    def compute():
        calls.append(1)
        return extract_features(model, loader)

    first = cached_features(cache_dir, "k", compute)
    dist.barrier()
    second = cached_features(cache_dir, "k", compute)  # cache hit: nobody extracts
    return {"all": to_all, "rank0": to_rank0, "seen": n_seen, "calls": len(calls), "first": first, "second": second}


@pytest.mark.distributed
def test_sharded_extraction_equals_single_process_in_order(tmp_path):
    model, loader = _extraction_inputs()
    expected_f, expected_y = extract_features(model, loader, dtype=torch.float32)
    results = run_distributed(_sharded_worker, 2, str(tmp_path / "cache"))
    assert [r["seen"] for r in results] == [6, 5]  # disjoint shards, no padded duplicates
    for r in results:
        feats, labels = r["all"]
        torch.testing.assert_close(feats.float(), expected_f, rtol=1e-3, atol=1e-3)
        assert labels.tolist() == expected_y.tolist()
        assert feats.dtype == torch.float16 and labels.dtype == torch.int32
    torch.testing.assert_close(results[0]["rank0"][0].float(), expected_f, rtol=1e-3, atol=1e-3)
    assert results[1]["rank0"][0].shape == (0, 4) and len(results[1]["rank0"][1]) == 0
    # the cache: both ranks extract once together; rank 0 writes and later reads it; rank 1 gets nothing back
    assert [r["calls"] for r in results] == [1, 1]
    assert torch.equal(results[0]["second"][0], results[0]["first"][0])
    assert results[1]["second"][0].numel() == 0
    saved = torch.load(tmp_path / "cache" / "k.pt", weights_only=True)
    assert saved["features"].dtype == torch.float16 and saved["labels"].dtype == torch.int32
    assert saved["labels"].tolist() == expected_y.tolist()


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


def test_file_digest_is_sha256_and_memoised(tmp_path, monkeypatch):
    import hashlib

    import sslpipe.evaluation.features as features

    path = tmp_path / "a.ckpt"
    path.write_bytes(b"weights v1" * 1000)
    memo = str(tmp_path / "memo")
    assert file_digest(str(path), memo, chunk_bytes=777) == hashlib.sha256(path.read_bytes()).hexdigest()
    # Same path, size and mtime: the memo answers (in this process, and from disk in a new one) without reading.
    stat = path.stat()
    path.write_bytes(b"weights v2" * 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest(str(path), memo) == hashlib.sha256(b"weights v1" * 1000).hexdigest()
    monkeypatch.setattr(features, "_DIGESTS", {})
    assert file_digest(str(path), memo) == hashlib.sha256(b"weights v1" * 1000).hexdigest()
    # A rewrite that moves the mtime (as every checkpoint save does) is hashed again.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    assert file_digest(str(path), memo) == hashlib.sha256(b"weights v2" * 1000).hexdigest()


def test_feature_cache_key_follows_the_checkpoint_content(tmp_path):
    a, b = tmp_path / "a.ckpt", tmp_path / "copy" / "b.ckpt"
    a.write_bytes(b"\x01" * 4096)
    b.parent.mkdir()
    b.write_bytes(b"\x01" * 4096)
    key_a = feature_cache_key(str(a), split="train", image_size=32)
    assert feature_cache_key(str(b), split="train", image_size=32) == key_a  # a copy elsewhere reuses the features
    assert feature_cache_key(str(a), split="val", image_size=32) != key_a
    # Retrained in place: same path, same size; the mtime moves as with any real save.
    stat = a.stat()
    a.write_bytes(b"\x02" * 4096)
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert feature_cache_key(str(a), split="train", image_size=32) != key_a


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


@pytest.mark.slow  # ~30 s on 2 busy cores: two interpreters start and import torch, timm, Lightning
@pytest.mark.distributed
def test_knn_command_under_torchrun_equals_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m sslpipe.cli knn`: 2 ranks extract, rank 0 caches and scores as 1 process."""
    import glob
    import json
    import subprocess
    import sys

    from sslpipe.methods import SimCLR
    from tests.checkpoints import perturb_, save_method_checkpoint
    from tests.helpers import read_metrics, run_cli

    torch.manual_seed(0)
    method = perturb_(SimCLR(backbone="resnet10t", image_size=8, proj_hidden_dim=16, proj_output_dim=8))
    ckpt = save_method_checkpoint(method, str(tmp_path / "model.ckpt"))
    common = ["knn", "--checkpoint", ckpt, "--data.num_workers", "0", "--data.eval_batch_size", "256"]
    common += ["--trainer.precision", "32-true", "--knn.backend", "torch"]
    env = {k: v for k, v in os.environ.items() if k != "SSLPIPE_RUN_DIR"}
    env.update(OMP_NUM_THREADS="1", SSLPIPE_RUN_ID="knn2", PYTHONUNBUFFERED="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    proc = subprocess.run(
        [*launcher, "sslpipe.cli", *common, "--trainer.default_root_dir", str(tmp_path / "runs2")]
        + ["--feature_cache", str(tmp_path / "cache2")],
        capture_output=True, text=True, env=env, timeout=300, cwd=os.path.join(os.path.dirname(__file__), ".."),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = proc.stdout.strip().splitlines()[-1]  # printed once, by rank 0
    assert os.listdir(tmp_path / "runs2") == [os.path.basename(run_dir)]
    single, _ = run_cli(
        [*common, "--trainer.default_root_dir", str(tmp_path / "runs1"), "--feature_cache", str(tmp_path / "cache1")]
    )
    two, one = read_metrics(run_dir), read_metrics(single)
    assert two["knn_top1"] == one["knn_top1"] and two["knn_top5"] == one["knn_top5"]
    for split_rows in (1437, 360):
        got, want = [
            next(d for d in map(torch.load, glob.glob(f"{tmp_path}/{c}/*.pt")) if len(d["labels"]) == split_rows)
            for c in ("cache2", "cache1")
        ]
        assert torch.equal(got["labels"], want["labels"])
        torch.testing.assert_close(got["features"].float(), want["features"].float(), rtol=2e-3, atol=2e-3)
    with open(tmp_path / "cache2" / "checkpoint_digests.json") as f:
        assert len(json.load(f)) == 1  # rank 0 hashed the checkpoint once
