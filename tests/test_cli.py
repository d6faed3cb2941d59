"""End to end: `sslpipe pretrain` (digits config, tiny overrides), then `linear` and `knn` on its checkpoint.

The expensive runs are module-scoped fixtures shared by the tests that read them.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch
import wandb
import yaml

from sslpipe.cli import main
from sslpipe.evaluation import knn_predict, topk_accuracy
from sslpipe.runs import ENV_RUN_DIR
from tests.helpers import TINY, read_metrics, run_cli

CONFIG = "configs/simclr/digits.yaml"
# Validation every epoch (on TINY's 2 batches) so the online probe reports a number; 16-px images.
# Not `--trainer.limit_*_batches 1`: jsonargparse reads Lightning's Union[float, int] "1" as 1.0, i.e. 100%.
FAST = [
    *TINY,
    "--data.image_size",
    "16",
    "--trainer.check_val_every_n_epoch",
    "1",
    "--trainer.num_sanity_val_steps",
    "0",
]
# Feature extraction in few large batches (the cache key does not depend on the batch size).
EVAL_FAST = ["--data.eval_batch_size", "256"]


def _config(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.yaml")) as f:
        return yaml.safe_load(f)


def _yaml_config(path: str = CONFIG) -> dict:
    """A config's values with its ``config:`` bases merged under them (the tests follow them as they change)."""
    with open(path) as f:
        values = yaml.safe_load(f)
    base = values.pop("config", None)
    if base is None:
        return values

    def merge(low: dict, high: dict) -> dict:
        out = dict(low)
        for key, value in high.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    return merge(_yaml_config(os.path.join(os.path.dirname(path), base)), values)


def _checkpoint(run_dir: str) -> dict:
    return torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=False)


def _assert_run_dir(run_dir: str, runs_dir: str, prefix: str) -> None:
    """The printed last line is the run directory, under the root, holding config.yaml and metrics.json."""
    assert os.path.isdir(run_dir)
    assert os.path.dirname(os.path.abspath(run_dir)) == os.path.abspath(runs_dir)
    assert prefix in os.path.basename(run_dir)
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert os.path.isfile(os.path.join(run_dir, "metrics.json"))


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cli") / "runs")


@pytest.fixture(scope="module")
def pretrained(runs_root) -> str:
    run_dir, _ = run_cli(["pretrain", "--config", CONFIG, "--trainer.default_root_dir", runs_root, *FAST])
    return run_dir


@pytest.fixture(scope="module")
def knn_runs(pretrained, runs_root) -> dict[str, str]:
    """kNN of the trained checkpoint (default feature cache) and of its random init (a cache folder of its own)."""
    ckpt = os.path.join(pretrained, "checkpoints", "last.ckpt")
    common = ["--checkpoint", ckpt, "--trainer.default_root_dir", runs_root, *EVAL_FAST]
    trained, _ = run_cli(["knn", *common])
    random_cache = os.path.join(os.path.dirname(runs_root), "random_features")
    random, _ = run_cli(["knn", *common, "--random_init", "true", "--feature_cache", random_cache])
    return {
        "trained": trained,
        "random": random,
        "trained_cache": os.path.join(pretrained, "features"),
        "random_cache": random_cache,
    }


def _cached(folder: str, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (features, labels) file of ``folder`` holding ``num_images`` rows (digits: 1437 train, 360 val)."""
    entries = [torch.load(p) for p in glob.glob(os.path.join(folder, "*.pt"))]
    matches = [(e["features"], e["labels"]) for e in entries if len(e["labels"]) == num_images]
    assert len(matches) == 1, f"{len(matches)} cached feature sets of {num_images} images in {folder}"
    return matches[0]


# ------------------------------------------------------------------ pretrain
def test_pretrain_run_dir_and_metrics(pretrained, runs_root):
    _assert_run_dir(pretrained, runs_root, "pretrain-simclr-digits")
    metrics = read_metrics(pretrained)
    assert metrics["method"] == "simclr" and metrics["dataset"] == "digits"
    assert metrics["epochs"] == 1 and metrics["global_step"] == 3
    assert "train_images_per_second" in metrics  # None here: 3 steps are within the warm-up it skips
    assert isinstance(metrics["online_linear_top1"], float) and 0.0 <= metrics["online_linear_top1"] <= 100.0
    assert metrics["train_loss"] > 0
    assert os.path.isfile(os.path.join(pretrained, "checkpoints", "last.ckpt"))
    assert os.path.isfile(os.path.join(pretrained, "checkpoints", "best.ckpt"))  # monitored on the online probe


def test_dotted_override_image_size(pretrained):
    assert _yaml_config()["data"]["image_size"] != 16
    config = _config(pretrained)
    assert config["data"]["image_size"] == 16
    assert config["model"]["class_path"] == "sslpipe.methods.SimCLR"
    ckpt = _checkpoint(pretrained)
    assert ckpt["hyper_parameters"]["image_size"] == 16  # linked from data into the model
    assert ckpt["datamodule_hyper_parameters"]["image_size"] == 16
    assert ckpt["sslpipe_method"] == "sslpipe.methods.simclr.SimCLR"


# ------------------------------------------------------------------ evaluation
def test_knn_on_checkpoint(knn_runs, pretrained, runs_root):
    run_dir = knn_runs["trained"]
    _assert_run_dir(run_dir, runs_root, "knn-simclr-digits")
    metrics = read_metrics(run_dir)
    assert metrics["method"] == "simclr" and metrics["random_init"] is False
    assert 0.0 <= metrics["knn_top1"] <= metrics["knn_top5"] <= 100.0
    assert metrics["feature_dim"] == _checkpoint(pretrained)["state_dict"]["probe.linear.weight"].shape[1]
    assert _config(run_dir)["checkpoint"].endswith("last.ckpt")
    # features are cached next to the checkpoint (train and val); --feature_cache picks another folder
    assert len(glob.glob(os.path.join(knn_runs["trained_cache"], "*.pt"))) == 2
    assert len(glob.glob(os.path.join(knn_runs["random_cache"], "*.pt"))) == 2


def test_random_init_differs(knn_runs):
    """`--random_init true` evaluates the untrained network: other features, other kNN scores.

    Three tiny warm-up steps barely move the top-1/top-5 numbers (they can tie), so the kNN class
    scores are compared, recomputed from each run's cached features; the reported top-1 must be theirs.
    """
    random_metrics = read_metrics(knn_runs["random"])
    assert random_metrics["method"] == "simclr-random" and random_metrics["random_init"] is True
    assert "knn-simclr-random-digits" in os.path.basename(knn_runs["random"])
    scores = {}
    for name in ("trained", "random"):
        (xtr, ytr), (xva, yva) = _cached(knn_runs[f"{name}_cache"], 1437), _cached(knn_runs[f"{name}_cache"], 360)
        metrics = read_metrics(knn_runs[name])
        scores[name] = knn_predict(xtr, ytr, xva, 10, k=metrics["knn_k"], temperature=metrics["knn_temperature"])
        assert metrics["knn_top1"] == pytest.approx(100 * topk_accuracy(scores[name], yva, (1,))[1])
    assert not torch.allclose(scores["trained"], scores["random"], rtol=1e-2, atol=1e-3)


def test_linear_on_checkpoint(knn_runs, pretrained, runs_root):
    cache = os.path.join(pretrained, "features", "*.pt")
    before = {p: os.path.getmtime(p) for p in glob.glob(cache)}
    assert len(before) == 2  # train and val, written by the kNN run
    run_dir, out = run_cli(
        [
            "linear",
            "--checkpoint",
            os.path.join(pretrained, "checkpoints", "last.ckpt"),
            "--trainer.default_root_dir",
            runs_root,
            *EVAL_FAST,
            "--linear.epochs",
            "2",
            "--linear.lrs",
            "[0.1, 1.0]",
            "--linear.weight_decays",
            "[0.0]",
        ]
    )
    _assert_run_dir(run_dir, runs_root, "linear-simclr-digits")
    assert out.strip().splitlines()[-1] == run_dir
    metrics = read_metrics(run_dir)
    assert metrics["method"] == "simclr"
    assert 0.0 <= metrics["linear_top1"] <= metrics["linear_top5"] <= 100.0
    assert [s["lr"] for s in metrics["linear_sweep"]] == [0.1, 1.0]
    assert metrics["linear_lr"] in (0.1, 1.0)
    assert _config(run_dir)["linear"]["epochs"] == 2
    # the kNN run's cached features were reused, not recomputed
    assert {p: os.path.getmtime(p) for p in glob.glob(cache)} == before


# ------------------------------------------------------------------ resume, print_config, loggers
def test_resume_continues_global_step(pretrained, runs_root):
    ckpt = os.path.join(pretrained, "checkpoints", "last.ckpt")
    run_dir, _ = run_cli(
        [
            "pretrain",
            "--config",
            CONFIG,
            "--trainer.default_root_dir",
            runs_root,
            *FAST,
            "--trainer.max_epochs",
            "3",
            "--ckpt_path",
            ckpt,
        ]
    )
    assert run_dir != pretrained
    metrics = read_metrics(run_dir)
    assert metrics["global_step"] == 9 and metrics["epochs"] == 3  # 3 steps restored + 2 epochs of 3
    assert metrics["train_images_per_second"] > 0  # 6 steps in this run: past the 5 skipped ones
    assert _config(run_dir)["ckpt_path"] == ckpt


def test_print_config(capsys, tmp_path):
    root = str(tmp_path / "runs")
    os.environ.pop(ENV_RUN_DIR, None)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "pretrain",
                "--config",
                CONFIG,
                "--trainer.default_root_dir",
                root,
                "--data.image_size",
                "16",
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "sslpipe.methods.SimCLR"
    assert printed["model"]["init_args"]["temperature"] == _yaml_config()["model"]["init_args"]["temperature"]
    assert printed["data"]["image_size"] == 16
    assert printed["data"]["views"]["class_path"] == "sslpipe.augment.SimCLRViews"
    assert not os.path.exists(root)  # nothing ran


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.mark.parametrize("config", sorted(p for p in glob.glob("configs/*/*.yaml") if "/base/" not in p))
def test_every_config_composes_its_bases_and_parses(config, capsys):
    """Each shipped config, read alone with --config, resolves to its own values over its bases' values."""
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--config", config, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = _leaves(yaml.safe_load(capsys.readouterr().out))
    expected = _leaves(_yaml_config(config))
    assert {k: printed.get(k) for k in expected} == {k: _normalise(v) for k, v in expected.items()}
    assert printed["seed_everything"] == 0 and printed["trainer.default_root_dir"] == "runs"  # the code's defaults


def _normalise(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.fixture(scope="module")
def wandb_run(runs_root) -> str:
    previous = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    try:
        run_dir, _ = run_cli(
            [
                "pretrain",
                "--config",
                CONFIG,
                "--trainer.default_root_dir",
                runs_root,
                *FAST,
                "--trainer.limit_train_batches",
                "2",
                "--run.loggers",
                "[csv,wandb]",
                "--model.backbone",
                "resnet10t",
                "--model.temperature",
                "0.37",
            ]
        )
    finally:
        if previous is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = previous
    return run_dir


def test_wandb_offline_logger(wandb_run):
    assert read_metrics(wandb_run)["global_step"] == 2
    runs = glob.glob(os.path.join(wandb_run, "wandb", "offline-run-*"))
    assert len(runs) == 1 and os.path.isdir(runs[0])
    assert os.path.isdir(os.path.join(wandb_run, "csv"))
    # the W&B run was finished: a later run in this process starts its own instead of logging into this one
    assert wandb.run is None


def test_dotted_override_backbone(wandb_run):
    assert _yaml_config()["model"]["init_args"]["backbone"] != "resnet10t"
    config = _config(wandb_run)
    assert config["model"]["init_args"]["backbone"] == "resnet10t"
    assert config["model"]["init_args"]["temperature"] == 0.37
    assert config["run"]["loggers"] == ["csv", "wandb"]
    hparams = _checkpoint(wandb_run)["hyper_parameters"]
    assert hparams["backbone"] == "resnet10t" and hparams["temperature"] == 0.37
