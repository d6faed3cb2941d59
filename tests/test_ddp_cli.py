"""The real multi-process path: `sslpipe pretrain` with Lightning's DDP strategy on 2 CPU processes (gloo)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import TINY

# Per method: extra flags, and the buffers every rank updates on its own that must end identical.
CASES = {
    "simclr": ([], ()),
    # Shuffle-BN across the two ranks, and the queue filled with the keys of both.
    "moco_v2": (["--model.init_args.bn_splits", "1"], ("queue.queue", "queue.ptr", "key_encoder.num_updates")),
    # The memory bank written with both ranks' embeddings, and Z estimated from both.
    "pirl": (
        ["--data.image_size", "32", "--data.views.init_args.tile_size", "8", "--model.init_args.loss_form", "nce"],
        ("memory.bank", "nce_log_z"),
    ),
}


@pytest.mark.distributed
@pytest.mark.parametrize("method", list(CASES))
def test_pretrain_ddp_two_cpu_processes(method, tmp_path):
    extra, shared = CASES[method]
    root = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "SSLPIPE_RUN_DIR"}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "sslpipe.cli",
        "pretrain",
        "--config",
        f"configs/{method}/digits.yaml",
        *TINY,
        "--data.batch_size",
        "16",
        "--data.image_size",
        "16",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.callbacks+=tests.rank_state.DumpRankState",
        *extra,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=300, cwd=os.path.join(os.path.dirname(__file__), "..")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = proc.stdout.strip().splitlines()[-1]
    # Rank 1 is a separate process started by Lightning; it must write into rank 0's run directory.
    assert os.listdir(root) == [os.path.basename(run_dir)]
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["world_size"] == 2
    assert metrics["global_step"] == 2
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "last.ckpt"))

    ranks = [torch.load(os.path.join(run_dir, f"state_rank{r}.pt")) for r in range(2)]
    assert set(shared) <= set(ranks[0])
    assert ranks[0]["seed"] != ranks[1]["seed"]  # each rank draws its own masks, noise and negatives
    for name in shared:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between the ranks"
    if method == "moco_v2":  # 2 steps x 2 ranks x 16 images x 2 views (symmetric); DDP does not re-send the queue
        assert int(ranks[0]["queue.ptr"]) == 128 and int(ranks[0]["key_encoder.num_updates"]) == 2
        assert {"queue.queue", "queue.ptr", "key_encoder.num_updates"} <= set(ranks[0]["ddp_ignored"])
    if method == "pirl":  # the slots of both ranks' images moved away from their random start
        from sslpipe.memory import MemoryBank

        moved = (ranks[0]["memory.bank"] != MemoryBank(1437, 128, seed=0).bank).any(1).sum()
        assert moved == 2 * 2 * 16 and torch.isfinite(ranks[0]["nce_log_z"])
        assert "memory.bank" in ranks[0]["ddp_ignored"]
