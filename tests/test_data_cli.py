"""End to end through `sslpipe`: bad data stops a run with one message (exit 2), `skip` trains without it,
and unlabeled folders pretrain without a probe and evaluate only on `--data.eval_root`."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from sslpipe.cli import main
from tests.helpers import TINY, read_metrics, run_cli
from tests.test_data_scan import bad_folder, write_classes, write_unlabeled

# Tiny ResNet-18 SimCLR on 16-px crops of a few 20-px images: 3 batches of 8.
SIMCLR = [
    "--config",
    "configs/simclr/digits.yaml",
    *TINY,
    "--data.batch_size",
    "8",
    "--data.image_size",
    "16",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.check_val_every_n_epoch",
    "1",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A module-wide folder, with the scan cache inside it (never the user's ~/.cache)."""
    path = tmp_path_factory.mktemp("data_cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSLPIPE_CACHE_DIR", str(path / "scan-cache"))
        yield path


@pytest.fixture(scope="module")
def bad_root(workdir) -> tuple[str, dict[str, str]]:
    root = str(workdir / "bad")
    bad = bad_folder(root, val_bad=True)
    write_classes(
        os.path.join(root, "train"), {"cat": 8, "dog": 8}, seed=500, prefix="more"
    )  # enough for 3 batches of 8
    return root, bad


def _pretrain(root_dir: str, *args: str) -> list[str]:
    return ["pretrain", *SIMCLR, "--trainer.default_root_dir", root_dir, *args]


def test_bad_data_exits_2_naming_every_file(bad_root, workdir, capsys):
    root, bad = bad_root
    with pytest.raises(SystemExit) as exit_info:
        main(_pretrain(str(workdir / "runs"), "--data.dataset", "imagefolder", "--data.root", root))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "sslpipe pretrain: error:" in err and "Traceback" not in err
    for kind in ("truncated", "zero_byte", "text", "val_truncated"):  # train's and val's problems, one message
        assert os.path.abspath(bad[kind]) in err
    assert "fox" in err and "--data.on_bad_image skip" in err


def test_debug_shows_the_traceback(bad_root, workdir):
    from sslpipe.errors import DataError

    root, _ = bad_root
    with pytest.raises(DataError, match="cannot be read"):
        main([*_pretrain(str(workdir / "runs"), "--data.dataset", "imagefolder", "--data.root", root), "--debug"])


def test_missing_root_exits_2(workdir, capsys):
    missing = str(workdir / "no-such-folder")
    with pytest.raises(SystemExit) as exit_info:
        main(_pretrain(str(workdir / "runs"), "--data.dataset", "imagefolder", "--data.root", missing))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert missing in err and "--data.root" in err and "Traceback" not in err


def test_skip_trains_without_bad_files(bad_root, workdir, caplog):
    root, _ = bad_root
    with caplog.at_level(logging.WARNING, logger="sslpipe"):
        run_dir, _ = run_cli(
            _pretrain(
                str(workdir / "runs"),
                "--data.dataset",
                "imagefolder",
                "--data.root",
                root,
                "--data.on_bad_image",
                "skip",
            )
        )
    metrics = read_metrics(run_dir)
    assert metrics["global_step"] == 3 and metrics["online_linear_top1"] is not None
    assert "skipping 3 unreadable image file(s) of 31" in caplog.text  # train: 28 good + 3 bad
    assert "skipping 1 unreadable image file(s) of 7" in caplog.text  # val: 6 good + 1 truncated
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=False)
    assert ckpt["state_dict"]["probe.linear.weight"].shape[0] == 4  # cat, dog, eel, fox (empty, kept)
    assert ckpt["datamodule_hyper_parameters"]["on_bad_image"] == "skip"


# ------------------------------------------------------------------ unlabeled
@pytest.fixture(scope="module")
def unlabeled(workdir) -> dict[str, str]:
    root = str(workdir / "pile")
    write_unlabeled(root)
    write_unlabeled(os.path.join(root, "more"))
    write_unlabeled(os.path.join(root, "more", "again"))  # 24 images
    labelled = workdir / "labelled"
    write_classes(str(labelled / "train"), {"p": 6, "q": 6}, seed=700)
    write_classes(str(labelled / "val"), {"p": 3, "q": 3}, seed=800)
    runs = str(workdir / "runs_unlabeled")
    # eval_root given at pretraining: stored in the checkpoint, where evaluation finds it; still no probe
    run_dir, _ = run_cli(
        _pretrain(runs, "--data.dataset", "unlabeled", "--data.root", root, "--data.eval_root", str(labelled))
    )
    return {"root": root, "labelled": str(labelled), "runs": runs, "run_dir": run_dir}


def test_unlabeled_pretrains_without_probe(unlabeled):
    run_dir = unlabeled["run_dir"]
    metrics = read_metrics(run_dir)
    assert metrics["global_step"] == 3 and metrics["online_linear_top1"] is None
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["num_classes"] == 0  # eval_root has 2 classes, the pretraining images none
    assert ckpt["datamodule_hyper_parameters"]["eval_root"] == unlabeled["labelled"]
    assert not any(k.startswith("probe.") for k in ckpt["state_dict"])
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "best.ckpt"))  # nothing to monitor


@pytest.mark.parametrize("command", ["linear", "knn", "kmeans"])
def test_evaluating_unlabeled_checkpoint_needs_eval_root(unlabeled, command, capsys):
    ckpt = os.path.join(unlabeled["run_dir"], "checkpoints", "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [command, "--checkpoint", ckpt, "--trainer.default_root_dir", unlabeled["runs"], "--data.eval_root", "null"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pretrained on unlabeled data; pass --data.eval_root DIR with train/ and val/ class folders" in err


def test_evaluating_unlabeled_checkpoint_on_eval_root(unlabeled):
    ckpt = os.path.join(unlabeled["run_dir"], "checkpoints", "last.ckpt")
    common = ["--checkpoint", ckpt, "--trainer.default_root_dir", unlabeled["runs"]]
    common += ["--data.eval_batch_size", "64"]  # eval_root comes from the checkpoint
    knn_dir, _ = run_cli(["knn", *common, "--knn.k", "3"])
    assert 0.0 <= read_metrics(knn_dir)["knn_top1"] <= 100.0
    linear_dir, _ = run_cli(["linear", *common, "--linear.epochs", "2", "--linear.lrs", "[0.1]"])
    metrics = read_metrics(linear_dir)
    assert 0.0 <= metrics["linear_top1"] <= 100.0
    features = torch.load(
        os.path.join(
            unlabeled["run_dir"], "features", sorted(os.listdir(os.path.join(unlabeled["run_dir"], "features")))[0]
        ),
        map_location="cpu",
    )
    assert features["features"].shape[0] in (6, 12)  # eval_root's val (6) or train (12), not the 24 unlabeled


def test_masked_method_on_unlabeled_shows_pretraining_images(unlabeled, workdir):
    """MAE's reconstruction grid has no val split to draw from: it uses the pretraining images."""
    run_dir, _ = run_cli(
        [
            "pretrain",
            "--config",
            "configs/mae/digits.yaml",
            *TINY,
            "--data.batch_size",
            "8",
            "--data.image_size",
            "16",
            "--data.dataset",
            "unlabeled",
            "--data.root",
            unlabeled["root"],
            "--model.backbone_kwargs",
            "{patch_size: 4, depth: 1}",
            "--trainer.default_root_dir",
            str(workdir / "runs_mae"),
        ]
    )
    assert os.listdir(os.path.join(run_dir, "reconstructions")) == ["epoch_000.png"]
