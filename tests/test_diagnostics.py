"""Representation diagnostics: the metrics against their formulas written out on hand-made embeddings, and the
RepresentationDiagnostics callback on a collapsed model (warns, stops by flag) and on a real tiny run (rankme in
metrics.json and best_rank.ckpt equal an independent computation from the checkpoints)."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from sslpipe.callbacks import CollapseWarning, RepresentationDiagnostics
from sslpipe.evaluation.diagnostics import (
    alignment,
    dimension_std,
    effective_rank,
    pair_energies,
    representation_metrics,
    uniformity,
)
from tests.helpers import read_metrics, run_cli
from tests.test_cli import CONFIG, FAST


# ------------------------------------------------------------------ the formulas, written out
def rankme_by_hand(z: np.ndarray, eps: float = 1e-7) -> float:
    """Garrido et al. (2023), eq. 1: p_k = s_k / sum(s) + eps, RankMe = exp(-sum p_k log p_k)."""
    s = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def unit(z: np.ndarray) -> np.ndarray:
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def uniformity_by_hand(z: np.ndarray, t: float = 2.0) -> float:
    """log of the mean over pairs i < j of exp(-t ||x_i - x_j||^2), unit vectors."""
    x = unit(z.astype(np.float64))
    terms = [math.exp(-t * float(((x[i] - x[j]) ** 2).sum())) for i in range(len(x)) for j in range(i + 1, len(x))]
    return math.log(sum(terms) / len(terms))


def test_collapsed_embedding_rank_one_uniformity_zero():
    g = torch.Generator().manual_seed(0)
    d = 32
    z = torch.randn(1, d, generator=g).repeat(200, 1) * torch.rand(200, 1, generator=g).add(0.5)  # one direction
    rank = effective_rank(z).item()
    eps = 1e-7  # one singular value: p = (1 + eps, eps, ..., eps)
    expected = math.exp(-((1 + eps) * math.log(1 + eps) + (d - 1) * eps * math.log(eps)))
    assert rank == pytest.approx(expected, abs=1e-3) and rank == pytest.approx(1.0, abs=1e-3)
    assert uniformity(z).item() == pytest.approx(0.0, abs=1e-5)
    mean_std, min_std = dimension_std(z)
    assert mean_std.item() == pytest.approx(0.0, abs=1e-6) and min_std.item() == pytest.approx(0.0, abs=1e-6)


def test_isotropic_gaussian_has_full_rank():
    g = torch.Generator().manual_seed(1)
    d = 16
    z = torch.randn(4000, d, generator=g)
    rank = effective_rank(z).item()
    assert rank == pytest.approx(rankme_by_hand(z.numpy()), rel=1e-4)
    assert d - 0.5 < rank <= d + 1e-3
    # normalised rows spread over the sphere: every dimension has std ~ 1/sqrt(d)
    mean_std, min_std = dimension_std(z)
    assert mean_std.item() == pytest.approx(1 / math.sqrt(d), rel=0.02)
    assert min_std.item() == pytest.approx(1 / math.sqrt(d), rel=0.05)
    std = unit(z.numpy().astype(np.float64)).std(axis=0)
    assert mean_std.item() == pytest.approx(std.mean(), rel=1e-5) and min_std.item() == pytest.approx(
        std.min(), rel=1e-5
    )


@pytest.mark.parametrize("k", [1, 3, 7])
def test_rank_k_embedding_has_rank_k(k):
    g = torch.Generator().manual_seed(k)
    d = 24
    basis = torch.linalg.qr(torch.randn(d, k, generator=g))[0]  # k orthonormal directions
    z = torch.randn(5000, k, generator=g) @ basis.T
    rank = effective_rank(z).item()
    assert rank == pytest.approx(rankme_by_hand(z.numpy()), rel=1e-4)
    assert rank == pytest.approx(k, abs=0.15 * k)


def test_uniformity_is_the_mean_over_distinct_pairs():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(30, 5, generator=g) * 3
    assert uniformity(z).item() == pytest.approx(uniformity_by_hand(z.numpy()), rel=1e-5)
    assert uniformity(z, t=0.5).item() == pytest.approx(uniformity_by_hand(z.numpy(), t=0.5), rel=1e-5)


def test_alignment_zero_for_identical_pairs_and_the_formula_otherwise():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    assert alignment(z1, 2.5 * z1).item() == pytest.approx(0.0, abs=1e-6)  # same directions
    a, b = unit(z1.numpy().astype(np.float64)), unit(z2.numpy().astype(np.float64))
    for alpha in (2.0, 1.0):
        expected = np.mean([np.linalg.norm(a[i] - b[i]) ** alpha for i in range(len(a))])
        assert alignment(z1, z2, alpha).item() == pytest.approx(expected, rel=1e-5)


def test_pair_energies_are_the_cosines_of_positive_and_negative_pairs():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    pos, neg = pair_energies(z1, z2)
    a, b = unit(z1.numpy().astype(np.float64)), unit(z2.numpy().astype(np.float64))
    expected_pos = [-float(a[i] @ b[i]) for i in range(6)]
    expected_neg = [-float(a[i] @ b[j]) for i in range(6) for j in range(6) if i != j]
    np.testing.assert_allclose(pos.numpy(), expected_pos, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(neg.numpy(), expected_neg, rtol=1e-5, atol=1e-6)
    metrics = representation_metrics(z1, z1, z2)
    assert metrics["energy_pos"].item() == pytest.approx(np.mean(expected_pos), rel=1e-5)
    assert metrics["energy_neg"].item() == pytest.approx(np.mean(expected_neg), rel=1e-5)


# ------------------------------------------------------------------ the callback on a collapsed model
class ConstantBackbone(nn.Module):
    """Every image gets the same feature vector: the representation has collapsed completely."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.vector = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vector.expand(images.shape[0], -1) + 0 * images.mean()


def _collapsed_fit(tmp_path, on_collapse: str, max_epochs: int = 3):
    from sslpipe.data import SSLDataModule
    from sslpipe.methods import SimCLR

    pl.seed_everything(0, verbose=False)
    model = SimCLR(backbone="resnet18", image_size=16, proj_hidden_dim=32, proj_output_dim=16, warmup_epochs=0)
    model.backbone = ConstantBackbone(model.feature_dim)
    data = SSLDataModule("digits", image_size=16, batch_size=32, num_workers=0)
    diagnostics = RepresentationDiagnostics(
        every_n_epochs=1, num_images=64, collapse_rank_threshold=2.0, on_collapse=on_collapse
    )
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path),
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[diagnostics],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=data)
    collapse = [str(w.message) for w in caught if issubclass(w.category, CollapseWarning)]
    return trainer, collapse


def test_collapsed_model_stops_and_keeps_best_rank(tmp_path):
    trainer, collapse = _collapsed_fit(tmp_path, "stop")
    assert len(collapse) == 1 and "epoch 0" in collapse[0] and "stopping" in collapse[0], collapse
    assert trainer.current_epoch == 1  # stopped after the first of 3 epochs
    metrics = read_metrics(str(tmp_path))
    assert metrics["rankme"] == pytest.approx(1.0, abs=1e-2)
    assert metrics["collapse_epoch"] == 0
    assert metrics["diag_uniformity"] == pytest.approx(0.0, abs=1e-4)
    best = torch.load(tmp_path / "checkpoints" / "best_rank.ckpt", map_location="cpu", weights_only=False)
    assert best["epoch"] == 0


def test_collapsed_model_warns_every_epoch_and_trains_on(tmp_path):
    trainer, collapse = _collapsed_fit(tmp_path, "warn", max_epochs=2)
    assert [("epoch 0" in m, "epoch 1" in m) for m in collapse] == [(True, False), (False, True)]
    assert trainer.current_epoch == 2


# ------------------------------------------------------------------ the callback in a real run, end to end
def _rankme_of_checkpoint(path: str) -> float:
    """RankMe of the L2-normalised features of every digits val image (the sample is all 360 of them), computed
    through the evaluation path (load_method + the eval loader) rather than the callback's."""
    from sslpipe.checkpoints import load_method
    from sslpipe.data import SSLDataModule

    model = load_method(path).eval()
    data = SSLDataModule("digits", image_size=16, batch_size=32, eval_batch_size=400, num_workers=0)
    images, _ = next(iter(data.eval_dataloader("val")))
    with torch.no_grad():
        features = model(images).double().numpy()
    return rankme_by_hand(unit(features))


def test_pretrain_writes_rankme_and_best_rank_checkpoint(runs_dir):
    run_dir, _ = run_cli(
        [
            "pretrain",
            "--config",
            CONFIG,
            "--trainer.default_root_dir",
            runs_dir,
            *FAST,
            "--trainer.max_epochs",
            "2",
            "--trainer.limit_train_batches",
            "2",
            "--diagnostics.every_n_epochs",
            "1",
        ]
    )
    metrics = read_metrics(run_dir)
    ckpts = os.path.join(run_dir, "checkpoints")
    # 512 > 360 val images: the sample is the whole split, in order
    assert metrics["rankme"] == pytest.approx(_rankme_of_checkpoint(os.path.join(ckpts, "last.ckpt")), rel=1e-5)
    best = _rankme_of_checkpoint(os.path.join(ckpts, "best_rank.ckpt"))
    assert metrics["best_rankme"] == pytest.approx(best, rel=1e-5)
    assert metrics["best_rankme"] >= metrics["rankme"] - 1e-6
    assert "collapse_epoch" not in metrics
    import csv

    with open(os.path.join(run_dir, "csv", "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("diag/rankme")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert float(rows[-1]["diag/rankme"]) == pytest.approx(metrics["rankme"], rel=1e-5)
