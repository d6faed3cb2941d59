from tests.helpers import TINY, read_metrics, run_cli


def test_pretrain_then_knn_writes_metrics(runs_dir):
    run_dir, _ = run_cli(["pretrain", "--config", "configs/simclr/digits.yaml", "--trainer.default_root_dir", runs_dir, *TINY])
    metrics = read_metrics(run_dir)
    assert metrics["method"] == "simclr" and metrics["global_step"] == 3
    eval_dir, out = run_cli(["knn", "--checkpoint", f"{run_dir}/checkpoints/last.ckpt", "--trainer.default_root_dir", runs_dir])
    assert 0 <= read_metrics(eval_dir)["knn_top1"] <= 100
