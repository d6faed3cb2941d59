"""Resilience: bad settings stop at config time, SIGTERM saves and resumes exactly, NaN stops safely, W&B never hangs.

The resume tests run real ``sslpipe pretrain`` subprocesses on digits: an uninterrupted run, a run killed with
SIGTERM once it has written a checkpoint, and its continuation with ``--ckpt_path last``; the per-step training
losses of the two must be equal, bit for bit, on the CPU.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from sslpipe.callbacks import strict_json, write_metrics
from tests.helpers import TINY, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _strict_load(path: str) -> dict:
    """Parse JSON refusing NaN/Infinity (what a strict parser, e.g. a browser's, does)."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-strict JSON constant {token}")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------- 3. bad config
BAD_CONFIGS = [
    ("simclr", ["--model.init_args.temperature", "0"], "model.temperature=0.0"),
    ("simclr", ["--model.init_args.temperature", "-0.5"], "model.temperature=-0.5"),
    ("moco_v2", ["--model.init_args.queue_size", "0"], "model.queue_size=0"),
    ("simclr", ["--model.init_args.proj_output_dim", "0"], "model.proj_output_dim=0"),
    ("pirl", ["--model.init_args.num_negatives", "0"], "model.num_negatives=0"),
    ("mae", ["--data.image_size", "30"], "data.image_size=30 is not divisible by the patch size 4"),
    ("simmim", ["--data.image_size", "30"], "data.image_size=30 is not divisible by the patch size 4"),
    ("mae", ["--model.init_args.mask_ratio", "1.0"], "model.mask_ratio=1.0"),
    ("mae", ["--model.init_args.mask_ratio", "0"], "model.mask_ratio=0.0"),
    ("simmim", ["--model.init_args.mask_ratio", "1.5"], "model.mask_ratio=1.5"),
    ("simclr", ["--data.batch_size", "0"], "data.batch_size=0"),
    ("simclr", ["--data.image_size", "-32"], "data.image_size=-32"),
    ("simclr", ["--model.init_args.backbone", "resnet_nope"], "model.backbone='resnet_nope' is unknown"),
    ("simclr", ["--data.dataset", "nope"], "data.dataset='nope' is unknown: choose one of 'cifar10'"),
    ("simclr", ["--run.loggers", "[csv,nope]"], "run.loggers='nope' is invalid: choose one of 'csv', 'wandb'"),
    ("simclr", ["--run.on_nan", "ignore"], "run.on_nan='ignore' is invalid: choose one of 'stop', 'skip'"),
]


@pytest.mark.parametrize("method,args,expected", BAD_CONFIGS, ids=[f"{m}-{a[0]}={a[1]}" for m, a, _ in BAD_CONFIGS])
def test_bad_config_rejected_before_data(method, args, expected, runs_dir, monkeypatch, capsys):
    from sslpipe.data import SSLDataModule

    def touched(self, *a, **k):
        raise AssertionError("data was read before the bad setting was reported")

    for hook in ("prepare_data", "setup", "split_dataset", "train_dataloader"):
        monkeypatch.setattr(SSLDataModule, hook, touched)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            [
                "pretrain",
                "--config",
                f"configs/{method}/digits.yaml",
                *TINY,
                "--trainer.default_root_dir",
                runs_dir,
                *args,
            ]
        )
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sslpipe pretrain: error:")]
    assert len(errors) == 1, errors
    assert expected in errors[0], errors[0]


# ---------------------------------------------------------------------------------------------- 4. interrupts
EPOCHS, BATCHES = 2, 4  # 8 optimiser steps; the kill lands in epoch 0, the resumed run crosses into epoch 1
METHOD_ARGS = {
    "simclr": ["--config", "configs/simclr/digits.yaml", "--data.image_size", "16"],
    "moco_v2": [
        "--config",
        "configs/moco_v2/digits.yaml",
        "--data.image_size",
        "16",
        "--model.init_args.queue_size",
        "96",
        "--model.init_args.bn_splits",
        "2",
    ],
    "pirl": [
        "--config",
        "configs/pirl/digits.yaml",
        "--model.init_args.num_negatives",
        "64",
        "--model.init_args.loss_form",
        "nce",
    ],
}


def _pretrain_cmd(method: str, root: str, name: str, workers: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "sslpipe.cli", "pretrain", *METHOD_ARGS[method],
        "--model.init_args.backbone", "resnet10t", "--data.batch_size", "32", "--data.num_workers", str(workers),
        "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches", str(BATCHES),
        "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--trainer.precision", "32-true",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--run.loggers", "[csv]", "--run.checkpoint_every_n_steps", "1",
        "--trainer.default_root_dir", root, "--run.name", name, *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("SSLPIPE_RUN_DIR", None)
    return env


def _losses(run_dir: str) -> dict[int, float]:
    """step -> train/loss from the run's CSV log (one row per step with log_every_n_steps=1, none twice)."""
    out: dict[int, float] = {}
    with open(os.path.join(run_dir, "csv", "metrics.csv")) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                assert int(row["step"]) not in out, f"step {row['step']} logged twice"
                out[int(row["step"])] = float(row["train/loss"])
    return out


@pytest.mark.parametrize(
    "method,workers,sig",
    [
        ("simclr", 0, signal.SIGTERM),
        ("moco_v2", 0, signal.SIGTERM),
        ("pirl", 0, signal.SIGTERM),
        ("simclr", 1, signal.SIGINT),
    ],
)
def test_sigterm_saves_and_resume_equals_uninterrupted(method, workers, sig, tmp_path):
    root, env = str(tmp_path / "runs"), _env()
    # The uninterrupted reference run.
    full = subprocess.run(
        _pretrain_cmd(method, root, "full", workers), cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert full.returncode == 0, full.stderr[-3000:]
    reference = _losses(os.path.join(root, "full"))
    assert sorted(reference) == list(range(EPOCHS * BATCHES))

    # The same run, sent SIGTERM as soon as it has written its first checkpoint.
    run_dir = os.path.join(root, "run")
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    proc = subprocess.Popen(
        _pretrain_cmd(method, root, "run", workers), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not os.path.exists(last) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    message = [line for line in stderr.splitlines() if line.startswith("sslpipe pretrain: error:")]
    assert len(message) == 1 and f"interrupted by {sig.name}" in message[0] and last in message[0], message

    checkpoint = torch.load(last, map_location="cpu", weights_only=True)  # RNG states etc. stay weights_only-safe
    stopped = checkpoint["global_step"]
    assert 1 <= stopped < EPOCHS * BATCHES, "SIGTERM must land mid-run"
    assert {"torch", "numpy", "python"} <= set(checkpoint["rng_states"])
    position = checkpoint["SSLDataModule"]
    assert position["epoch"] * BATCHES + position["batches"] == stopped  # the loader position is the step done
    metrics = _strict_load(os.path.join(run_dir, "metrics.json"))
    assert metrics["status"] == f"interrupted by {sig.name}" and metrics["global_step"] == stopped
    killed = _losses(run_dir)
    assert sorted(killed) == list(range(stopped))

    resumed = subprocess.run(
        _pretrain_cmd(method, root, "run", workers, "--ckpt_path", "last"), cwd=ROOT, env=env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logged = _losses(run_dir)  # the resumed run appends to the interrupted run's log
    assert sorted(logged) == list(range(EPOCHS * BATCHES)), "the resumed run repeats or skips steps"
    # Exactly equal: same batches, same augmentations, same random draws, same state.
    assert logged == reference
    assert _strict_load(os.path.join(run_dir, "metrics.json"))["status"] == "finished"


def test_ckpt_path_last_without_checkpoint_starts_fresh_with_warning(tmp_path):
    from sslpipe.pretrain import resolve_ckpt_path

    with pytest.warns(UserWarning, match="no checkpoint .* starting this run from scratch"):
        assert resolve_ckpt_path("last", str(tmp_path)) is None
    (tmp_path / "checkpoints").mkdir()
    old, new = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (1, 1))
    assert resolve_ckpt_path("last", str(tmp_path)) == str(new)  # the newest, SLURM's hpc_ckpt included
    assert resolve_ckpt_path("some.ckpt", str(tmp_path)) == "some.ckpt"


def test_named_run_reuses_its_directory(tmp_path, monkeypatch):
    from sslpipe.runs import ENV_RUN_DIR, make_run_dir

    monkeypatch.delenv(ENV_RUN_DIR, raising=False)
    for var in ("SSLPIPE_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    first = make_run_dir(str(tmp_path), ["pretrain"], "mine")
    monkeypatch.delenv(ENV_RUN_DIR)
    assert make_run_dir(str(tmp_path), ["pretrain"], "mine") == first == str(tmp_path / "mine")
    monkeypatch.delenv(ENV_RUN_DIR)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a requeued SLURM job finds its directory again
    a = make_run_dir(str(tmp_path), ["pretrain", "simclr"])
    monkeypatch.delenv(ENV_RUN_DIR)
    assert make_run_dir(str(tmp_path), ["pretrain", "simclr"]) == a and "job4242" in a


def test_sampler_resumes_mid_epoch_with_the_same_order():
    from sslpipe.resume import ResumableSampler, sample_seed

    data = list(range(50))
    for epoch in (0, 3):
        full = list(ResumableSampler(data, seed=7, epoch=epoch))
        # the order written out: randperm from seed + epoch, as DistributedSampler defines it
        expected = torch.randperm(50, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert [i for i, _ in full] == expected
        assert [s for _, s in full] == [sample_seed(7, epoch, i) for i in expected]
        sampler = ResumableSampler(data, seed=7, epoch=epoch, start=20)
        assert list(sampler) == full[20:]
        assert list(sampler) == full  # the skip applies to the first pass only
    sampler = ResumableSampler(data, seed=7, epoch=0, start=20)
    sampler.set_epoch(1)  # a later epoch is never shortened
    assert len(list(sampler)) == 50


# ---------------------------------------------------------------------------------------------- 5. NaN
def test_nonfinite_loss_stops_without_overwriting_good_checkpoint(runs_dir, capsys):
    args = [
        "pretrain", "--config", "configs/simclr/digits.yaml", *TINY, "--trainer.default_root_dir", runs_dir,
        "--run.name", "nan", "--data.image_size", "16", "--model.init_args.backbone", "resnet10t",
        "--trainer.limit_train_batches", "6", "--trainer.log_every_n_steps", "50", "--run.checkpoint_every_n_steps",
        "2", "--trainer.callbacks", "tests.nan_injector.PoisonAtStep", "--trainer.callbacks.init_args.step", "3",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sslpipe pretrain: error:")]
    run_dir = os.path.join(runs_dir, "nan")
    last = os.path.join(run_dir, "checkpoints", "last.ckpt")
    assert len(err) == 1 and "non-finite" in err[0] and "at step 3" in err[0], err
    assert f"{last} (step 2)" in err[0], err[0]
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2  # the step-4 save was refused: the good checkpoint survives
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    metrics = _strict_load(os.path.join(run_dir, "metrics.json"))
    assert metrics["status"] == "stopped: non-finite loss"


def test_evaluation_refuses_nonfinite_checkpoint(runs_dir, tmp_path, capsys):
    run_dir, _ = run_cli(
        [
            "pretrain",
            "--config",
            "configs/simclr/digits.yaml",
            *TINY,
            "--trainer.default_root_dir",
            runs_dir,
            "--data.image_size",
            "16",
            "--model.init_args.backbone",
            "resnet10t",
        ]
    )
    checkpoint = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
    key = next(k for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.") and v.is_floating_point())
    weight = checkpoint["state_dict"][key]
    weight[(0,) * weight.dim()] = float("nan")
    bad = str(tmp_path / "bad.ckpt")
    torch.save(checkpoint, bad)
    for command in ("knn", "export"):
        extra = ["--output", str(tmp_path / "out.safetensors")] if command == "export" else []
        with pytest.raises(SystemExit) as exit_info:
            run_cli([command, "--checkpoint", bad, *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "non-finite (NaN/inf) weights in " + key in err, err


def test_metrics_json_is_strict(tmp_path):
    path = write_metrics(str(tmp_path), {"loss": float("nan"), "top1": float("inf"), "nested": [1.0, -math.inf]})
    assert _strict_load(path) == {"loss": None, "top1": None, "nested": [1.0, None]}
    assert strict_json({"a": (0.5, float("nan"))}) == {"a": [0.5, None]}


# ---------------------------------------------------------------------------------------------- 6. W&B
def _no_netrc(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_online_without_key_or_network_falls_back(tmp_path, monkeypatch):
    import socket

    from sslpipe.runs import RunOptions, build_loggers

    _no_netrc(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "online")
    options = RunOptions(loggers=["csv", "wandb"])
    with pytest.warns(UserWarning, match="no API key"):
        loggers = build_loggers(str(tmp_path), options, "r")
    assert [type(x).__name__ for x in loggers] == ["CSVLogger"]

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.warns(UserWarning, match="cannot reach api.wandb.ai:443"):
        loggers = build_loggers(str(tmp_path), options, "r")
    assert [type(x).__name__ for x in loggers] == ["CSVLogger"]


def test_wandb_online_unreachable_run_finishes_on_csv(runs_dir, tmp_path, monkeypatch):
    import socket

    import wandb

    _no_netrc(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    def no_init(*args, **kwargs):
        raise AssertionError("wandb.init must not be called")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(wandb, "init", no_init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dir, _ = run_cli(
            [
                "pretrain",
                "--config",
                "configs/simclr/digits.yaml",
                *TINY,
                "--trainer.default_root_dir",
                runs_dir,
                "--data.image_size",
                "16",
                "--model.init_args.backbone",
                "resnet10t",
                "--run.loggers",
                "[csv,wandb]",
            ]
        )
    assert any("W&B online logging is off" in str(w.message) for w in caught)
    assert os.path.exists(os.path.join(run_dir, "csv", "metrics.csv"))
    assert not os.path.exists(os.path.join(run_dir, "wandb"))


def test_finish_loggers_never_starts_a_run(tmp_path, monkeypatch):
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    from sslpipe.runs import finish_loggers

    def no_init(*args, **kwargs):
        raise AssertionError("finish_loggers re-initialised W&B")

    monkeypatch.setattr(wandb, "init", no_init)
    finish_loggers([WandbLogger(project="p", save_dir=str(tmp_path), offline=True)])


def test_sample_augmentation_is_a_function_of_its_seed_alone():
    from sslpipe.data import SSLDataModule

    dataset = SSLDataModule(dataset="digits", image_size=16, batch_size=4, num_workers=0).split_dataset("pretrain")
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first, label, index = dataset[(5, 123)]
    assert torch.equal(torch.get_rng_state(), before), "loading a sample must leave the caller's stream alone"
    torch.manual_seed(2)  # another caller state: the same views
    again = dataset[(5, 123)][0]
    other = dataset[(5, 124)][0]  # another seed: other views
    assert (label, index) == (dataset.base[5][1], 5)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


def test_on_nan_skip_skips_the_update_and_finishes(runs_dir):
    args = [
        "pretrain", "--config", "configs/simclr/digits.yaml", *TINY, "--trainer.default_root_dir", runs_dir,
        "--run.name", "skip", "--data.image_size", "16", "--model.init_args.backbone", "resnet10t",
        "--trainer.limit_train_batches", "5", "--run.on_nan", "skip", "--run.checkpoint_every_n_steps", "2",
        "--trainer.callbacks", "tests.nan_injector.PoisonBatchAtStep", "--trainer.callbacks.init_args.step", "2",
    ]  # fmt: skip
    run_dir, _ = run_cli(args)
    metrics = _strict_load(os.path.join(run_dir, "metrics.json"))
    assert metrics["status"] == "finished" and metrics["skipped_nonfinite_steps"] == 1
    # step checkpoints and the end-of-epoch checkpoint share one last.ckpt (no last-v1.ckpt)
    assert not [f for f in os.listdir(os.path.join(run_dir, "checkpoints")) if f.startswith("last-v")]
    checkpoint = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_nonfinite_check_names_bad_tensors_but_not_unset_markers():
    from sslpipe.checkpoints import CheckpointError, check_finite_weights, nonfinite_names

    state = {
        "backbone.w": torch.ones(3),
        "head.b": torch.tensor([1.0, float("inf")]),
        "nce_log_z": torch.tensor(float("nan")),  # PIRL's "not estimated yet"
        "queue.ptr": torch.tensor(3),
    }
    assert nonfinite_names(state.items()) == ["head.b"]
    with pytest.raises(CheckpointError, match="non-finite .* in head.b"):
        check_finite_weights(state, "x.ckpt")


def test_nonfinite_guard_adds_no_host_sync_between_checks(monkeypatch):
    import types

    from sslpipe.callbacks import NonFiniteGuard, NonFiniteLossError

    guard = NonFiniteGuard()
    trainer = types.SimpleNamespace(global_step=1, log_every_n_steps=4, default_root_dir="/nonexistent")

    def forbidden(*args, **kwargs):
        raise AssertionError("device-to-host sync in the guard's per-step hook")

    with monkeypatch.context() as m:
        for attr in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
            m.setattr(torch.Tensor, attr, forbidden)
        for step, loss in [(1, 1.0), (2, float("nan")), (3, 2.0)]:  # steps 1-3: no check (every 4th step)
            trainer.global_step = step
            guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)
    trainer.global_step = 4
    with pytest.raises(NonFiniteLossError, match="at step 1 \\(1 such steps\\)"):  # the step before global_step 2
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, None, 4)
