"""The real multi-process path: `sslpipe pretrain` with Lightning's DDP strategy on 2 CPU processes (gloo)."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import TINY


@pytest.mark.distributed
def test_pretrain_ddp_two_cpu_processes_share_one_run_dir(tmp_path):
    root = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "SSLPIPE_RUN_DIR"}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "sslpipe.cli", "pretrain", "--config", "configs/simclr/digits.yaml",
           *TINY, "--data.batch_size", "16", "--data.image_size", "16", "--trainer.limit_train_batches", "2",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.default_root_dir", str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = proc.stdout.strip().splitlines()[-1]
    # Rank 1 is a separate process started by Lightning; it must write into rank 0's run directory.
    assert os.listdir(root) == [os.path.basename(run_dir)]
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["world_size"] == 2
    assert metrics["global_step"] == 2
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "last.ckpt"))
