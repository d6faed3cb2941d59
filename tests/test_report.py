"""`sslpipe report` on tiny real digits runs: report.md and valid PNGs; the energy histograms' means against an
independent computation on the same features; those features are the checkpoint's and its random-init twin's
(recomputed through load_method); two runs give one table with both rows and overlaid curves."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import run_cli
from tests.test_cli import CONFIG, FAST

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_IMAGES = 48


def _pretrain(root: str, epochs: int) -> str:
    run_dir, _ = run_cli(
        [
            "pretrain",
            "--config",
            CONFIG,
            "--trainer.default_root_dir",
            root,
            *FAST,
            "--trainer.max_epochs",
            str(epochs),
            "--trainer.limit_train_batches",
            "2",
            "--trainer.log_every_n_steps",
            "1",
            "--diagnostics.every_n_epochs",
            "1",
            "--diagnostics.num_images",
            "32",
        ]
    )
    return run_dir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[str, str]:
    root = str(tmp_path_factory.mktemp("report") / "runs")
    return _pretrain(root, 2), _pretrain(root, 1)


def _assert_png(path: str) -> None:
    assert os.path.getsize(path) > 1000, path
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 200
        pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 5, f"{path} is blank"


def _report(args: list[str], embeddings: tuple[str, ...] = ("pca", "tsne")) -> tuple[str, str]:
    return run_cli(["report", *args, "--num_images", str(NUM_IMAGES), "--embeddings", *embeddings])


def test_report_of_one_run(two_runs, tmp_path):
    run_dir = two_runs[0]
    out, stdout = _report([run_dir, "--output", str(tmp_path / "rep"), "--save_features"])
    assert out == str(tmp_path / "rep")
    md = open(os.path.join(out, "report.md")).read()
    for png in ("curves.png", "energies.png", "embedding.png"):
        assert f"]({png})" in md
        _assert_png(os.path.join(out, png))
    assert "rankme" in stdout and os.path.basename(run_dir) in stdout

    summary = json.load(open(os.path.join(out, "report.json")))
    (entry,) = summary["runs"]
    saved = torch.load(os.path.join(out, entry["features"]), map_location="cpu", weights_only=True)
    for model in ("trained", "random"):
        # the histogram means, recomputed pair by pair on the same features
        a = saved[model]["view1"].double().numpy()
        b = saved[model]["view2"].double().numpy()
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        n = len(a)
        assert n == NUM_IMAGES
        pos = np.mean([-a[i] @ b[i] for i in range(n)])
        neg = np.mean([-a[i] @ b[j] for i in range(n) for j in range(n) if i != j])
        stats = entry["stats"][model]
        assert stats["energy_pos_mean"] == pytest.approx(pos, abs=1e-5)
        assert stats["energy_neg_mean"] == pytest.approx(neg, abs=1e-5)
        assert f"{pos:+.3f}" in md and f"{neg:+.3f}" in md  # the report states them

    # The features are the checkpoint's and its random-init twin's: recompute them on the clean val images.
    from sslpipe.checkpoints import load_method
    from sslpipe.data import SSLDataModule

    ckpt = os.path.join(run_dir, "checkpoints", "last.ckpt")
    data = SSLDataModule("digits", image_size=16, eval_batch_size=400, num_workers=0)
    images, labels = next(iter(data.eval_dataloader("val")))
    images, labels = images[saved["indices"]], labels[saved["indices"]]
    assert torch.equal(saved["trained"]["labels"], labels)
    with torch.no_grad():
        trained = load_method(ckpt).eval()(images)
        torch.manual_seed(saved["seed"])
        random_twin = load_method(ckpt, random_init=True).eval()(images)
    torch.testing.assert_close(saved["trained"]["clean"], trained, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(saved["random"]["clean"], random_twin, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(trained, random_twin, atol=1e-2)


def test_report_of_two_runs_compares_them(two_runs, tmp_path):
    first, second = two_runs
    out, _ = _report([first, second, "--output", str(tmp_path / "cmp")], embeddings=())
    md = open(os.path.join(out, "report.md")).read()
    table = [line for line in md.splitlines() if line.startswith("|") and "simclr" in line]
    assert len(table) == 2
    assert os.path.basename(first) in table[0] and os.path.basename(second) in table[1]
    epochs = [cell.strip() for cell in table[0].split("|")] + [cell.strip() for cell in table[1].split("|")]
    assert "2" in epochs and "1" in epochs
    assert "runs overlaid" in md
    for png in ("curves.png", "run1-energies.png", "run2-energies.png"):
        _assert_png(os.path.join(out, png))
    assert not os.path.exists(os.path.join(out, "run1-embedding.png"))  # --embeddings with none: no embedding
