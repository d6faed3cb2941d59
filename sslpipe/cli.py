"""Command line: ``sslpipe pretrain | linear | knn | kmeans | report``.

``pretrain`` is a LightningCLI (``--config``, dotted overrides such as ``--model.backbone resnet50``,
``--print_config``); ``linear`` and ``knn`` read the method, its hyper-parameters and the data
settings from the checkpoint, so ``--checkpoint`` alone is enough, and accept the pretraining
YAML (``--config``) or dotted flags to change the data. Every command writes ``config.yaml`` and
``metrics.json`` into its run directory and prints that directory as its last line.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

USAGE = """usage: sslpipe {pretrain,linear,knn,kmeans,report} [options]

  pretrain --config FILE [--key value ...]       self-supervised pretraining (LightningCLI)
  linear   --checkpoint CKPT [--config FILE] ...  linear probe on frozen, cached features
  knn      --checkpoint CKPT [--config FILE] ...  weighted kNN (faiss) on frozen, cached features
  kmeans   --checkpoint CKPT [--config FILE] ...  k-means (faiss) of val features: NMI, ARI, accuracy
  report   RUN_DIR [RUN_DIR ...]                  table of the runs' metrics.json

Run `sslpipe COMMAND --help` for a command's options.
"""


# ============================================================================ pretrain
def _pretrain_cli_class():
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.cli import LightningCLI

    from sslpipe.callbacks import RunSummary
    from sslpipe.runs import RunOptions, build_loggers, make_run_dir

    class PretrainCLI(LightningCLI):
        """LightningCLI with sslpipe's run directory, default loggers and checkpoints."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(RunOptions, "run")
            parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="Resume from this checkpoint.")
            # The data knows the image size and label count; the model is told, never configured twice.
            parser.link_arguments("data.image_size", "model.init_args.image_size", apply_on="instantiate")
            parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

        def before_instantiate_classes(self) -> None:
            cfg = self.config
            module, _, name = cfg.model.class_path.rpartition(".")
            init_args = cfg.model.init_args.as_dict() if cfg.model.get("init_args") else {}
            self.method_name = getattr(importlib.import_module(module), name).method_label(init_args)
            self.run_dir = make_run_dir(
                cfg.trainer.default_root_dir, ["pretrain", self.method_name, cfg.data.dataset], cfg.run.name
            )
            cfg.trainer.default_root_dir = self.run_dir

        def instantiate_trainer(self, **kwargs: Any):
            cfg, init = self.config, self.config_init
            run_name = os.path.basename(self.run_dir)
            user_logger = init.trainer.get("logger")
            logger = (
                user_logger
                if user_logger not in (None, True)
                else build_loggers(self.run_dir, RunOptions(**cfg.run.as_dict()), run_name)
            )
            monitor = "val/online_linear_top1" if getattr(self.model, "probe", None) is not None else None
            checkpoint = ModelCheckpoint(
                dirpath=os.path.join(self.run_dir, "checkpoints"),
                filename="best",
                monitor=monitor,
                mode="max",
                save_top_k=1 if monitor else 0,
                save_last=True,
                enable_version_counter=False,
            )
            callbacks = list(init.trainer.get("callbacks") or [])
            callbacks += [checkpoint, RunSummary(self.run_dir, self.method_name, cfg.data.dataset)]
            if logger:
                callbacks.append(LearningRateMonitor(logging_interval="epoch"))
            return super().instantiate_trainer(logger=logger or False, callbacks=callbacks, **kwargs)

    return PretrainCLI


def pretrain(argv: Sequence[str]) -> str:
    """Run self-supervised pretraining from a config and overrides; returns the run directory."""
    from pytorch_lightning.utilities import rank_zero_only

    import sslpipe.methods  # noqa: F401  registers every method as a subclass of SSLMethod
    from sslpipe.data import SSLDataModule
    from sslpipe.methods import SSLMethod
    from sslpipe.runs import finish_loggers

    cli = _pretrain_cli_class()(
        SSLMethod,
        SSLDataModule,
        subclass_mode_model=True,
        run=False,
        args=list(argv),
        save_config_callback=None,
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "sslpipe pretrain", "description": "Self-supervised pretraining."},
    )
    if rank_zero_only.rank == 0:
        with open(os.path.join(cli.run_dir, "config.yaml"), "w") as f:
            f.write(cli.parser.dump(cli.config, skip_none=False))
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    finally:
        finish_loggers(cli.trainer.loggers)
    return cli.run_dir


# ============================================================================ linear / knn
@dataclass
class LinearOptions:
    """Linear-probe options (``linear.*``): the lr x weight-decay grid is searched on held-out training features."""

    lrs: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 1e-4])
    epochs: int = 100
    batch_size: int = 256
    holdout_fraction: float = 0.1


@dataclass
class KNNOptions:
    """kNN options (``knn.*``)."""

    k: int = 20
    temperature: float = 0.07


@dataclass
class KMeansOptions:
    """k-means options (``kmeans.*``); ``num_clusters`` None means the number of classes."""

    num_clusters: Optional[int] = None


def _eval_parser(command: str):
    from jsonargparse import ActionConfigFile, ArgumentParser
    from pytorch_lightning import Trainer

    from sslpipe.data import SSLDataModule
    from sslpipe.runs import RunOptions

    parser = ArgumentParser(prog=f"sslpipe {command}", description=f"{command} evaluation of a pretrained backbone.")
    parser.add_argument(
        "--config", action=ActionConfigFile, help="A YAML with data/trainer/linear/knn keys; pretraining YAMLs work."
    )
    parser.add_argument("--checkpoint", type=str, required=True, help="Checkpoint written by `sslpipe pretrain`.")
    parser.add_argument(
        "--random_init", type=bool, default=False, help="Evaluate the checkpoint's architecture at random init."
    )
    parser.add_argument(
        "--feature_cache",
        type=Optional[str],
        default=None,
        help="Feature cache folder (default: next to the checkpoint; 'none' disables).",
    )
    parser.add_argument("--seed_everything", type=Union[bool, int], default=0)
    # Accepted so a pretraining YAML can be passed as --config; the model comes from the checkpoint.
    parser.add_argument(
        "--model", type=Optional[dict], default=None, help="Ignored (the checkpoint defines the model)."
    )
    parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="Ignored.")
    parser.add_class_arguments(RunOptions, "run")
    parser.add_class_arguments(SSLDataModule, "data", fail_untyped=False)
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False)
    parser.add_class_arguments(LinearOptions, "linear")
    parser.add_class_arguments(KNNOptions, "knn")
    parser.add_class_arguments(KMeansOptions, "kmeans")
    return parser


def _checkpoint_data_defaults(path: str) -> dict[str, Any]:
    import torch

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found; pass --checkpoint <run dir>/checkpoints/last.ckpt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = ckpt.get("datamodule_hyper_parameters") or {}
    return {f"data.{k}": v for k, v in hp.items() if k != "views" and not k.startswith("_")}


def evaluate(command: str, argv: Sequence[str]) -> str:
    """Run ``linear``, ``knn`` or ``kmeans`` evaluation; returns the run directory."""
    import torch
    from pytorch_lightning import seed_everything

    from sslpipe.callbacks import write_metrics
    from sslpipe.data import SSLDataModule
    from sslpipe.evaluation import cached_features, extract_features, knn_classify, train_linear_probe
    from sslpipe.evaluation.clustering import clustering_scores
    from sslpipe.evaluation.features import cache_key
    from sslpipe.methods import load_method
    from sslpipe.runs import make_run_dir

    parser = _eval_parser(command)
    cfg = parser.parse_args(list(argv))
    parser.set_defaults(_checkpoint_data_defaults(cfg.checkpoint))
    cfg = parser.parse_args(list(argv))  # again, now with the checkpoint's data settings as defaults

    seed = 0 if cfg.seed_everything in (True, False) else int(cfg.seed_everything)
    seed_everything(seed, workers=True, verbose=False)
    model = load_method(cfg.checkpoint, random_init=cfg.random_init)
    method = model.method_label(dict(model.hparams)) + ("-random" if cfg.random_init else "")
    data_args = {k: v for k, v in cfg.data.as_dict().items() if k != "views"}
    data = SSLDataModule(**data_args)
    run_dir = make_run_dir(cfg.trainer.default_root_dir, [command, method, data.dataset], cfg.run.name)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(parser.dump(cfg, skip_none=False))

    accelerator = cfg.trainer.accelerator
    use_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if use_cuda else "cpu")
    precision = str(cfg.trainer.precision or "32-true")
    cache_dir = cfg.feature_cache or os.path.join(os.path.dirname(os.path.abspath(cfg.checkpoint)), "..", "features")
    if cfg.feature_cache is not None and cfg.feature_cache.lower() == "none":  # None (unset): the default folder
        cache_dir = None
    stat = os.stat(cfg.checkpoint)

    def features(split: str):
        key = cache_key(
            checkpoint=os.path.abspath(cfg.checkpoint),
            mtime=stat.st_mtime_ns,
            size=stat.st_size,
            random_init=cfg.random_init,
            seed=seed,
            split=split,
            dataset=data.dataset,
            root=os.path.abspath(data.root),
            image_size=data.image_size,
            precision=precision,
        )
        return cached_features(
            cache_dir,
            key,
            lambda: extract_features(model, data.eval_dataloader(split), device, precision, desc=f"{split} features"),
        )

    xva, yva = features("val")
    if command in ("linear", "knn"):  # k-means clusters the val split alone
        xtr, ytr = features("train")
    metrics: dict[str, Any] = {
        "method": method,
        "dataset": data.dataset,
        "checkpoint": os.path.abspath(cfg.checkpoint),
        "random_init": cfg.random_init,
        "feature_dim": int(xva.shape[1]),
    }
    if command == "linear":
        opts = cfg.linear
        result = train_linear_probe(
            xtr,
            ytr,
            xva,
            yva,
            data.num_classes,
            lrs=opts.lrs,
            weight_decays=opts.weight_decays,
            epochs=opts.epochs,
            batch_size=opts.batch_size,
            holdout_fraction=opts.holdout_fraction,
            seed=seed,
            device=device,
        )
        metrics.update(
            linear_top1=result.top1,
            linear_top5=result.top5,
            linear_lr=result.lr,
            linear_weight_decay=result.weight_decay,
            linear_sweep=result.sweep,
        )
        print(
            f"linear probe: top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  "
            f"(lr {result.lr}, wd {result.weight_decay})"
        )
    elif command == "kmeans":
        k = cfg.kmeans.num_clusters or data.num_classes
        metrics.update(clustering_scores(xva, yva, k, seed=seed), kmeans_clusters=k)
        print(
            f"k-means (k={k}) on val: NMI {metrics['kmeans_nmi']:.2f}  ARI {metrics['kmeans_ari']:.2f}  "
            f"accuracy {metrics['kmeans_accuracy']:.2f}%"
        )
    else:
        metrics.update(knn_classify(xtr, ytr, xva, yva, data.num_classes, k=cfg.knn.k, temperature=cfg.knn.temperature))
        metrics.update(knn_k=cfg.knn.k, knn_temperature=cfg.knn.temperature)
        print(
            f"kNN (k={cfg.knn.k}, T={cfg.knn.temperature}): "
            f"top-1 {metrics['knn_top1']:.2f}%  top-5 {metrics['knn_top5']:.2f}%"
        )
    write_metrics(run_dir, metrics)
    return run_dir


# ============================================================================ report
REPORT_COLUMNS = [
    "method",
    "dataset",
    "epochs",
    "train_images_per_second",
    "online_linear_top1",
    "linear_top1",
    "linear_top5",
    "knn_top1",
    "knn_top5",
    "kmeans_nmi",
    "kmeans_accuracy",
]


def report(argv: Sequence[str]) -> str:
    """Print a Markdown table of run directories' metrics (only the columns some run has).

    ``--merge`` folds runs of the same ``method`` into one row, so a pretraining run, its linear probe
    and its kNN evaluation read as one line.
    """
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="sslpipe report", description="Table of runs' metrics.json.")
    ap.add_argument("runs", nargs="+", help="run directories (or metrics.json files)")
    ap.add_argument("--columns", nargs="*", default=REPORT_COLUMNS, help="metrics to show, in order")
    ap.add_argument("--merge", action="store_true", help="one row per method (later runs fill in missing values)")
    args = ap.parse_args(list(argv))
    rows: list[dict[str, Any]] = []
    for run in args.runs:
        path = run if run.endswith(".json") else os.path.join(run, "metrics.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no metrics.json at {path!r}: pass run directories printed by sslpipe commands")
        with open(path) as f:
            row = json.load(f)
        same = [r for r in rows if args.merge and r.get("method") == row.get("method")]
        if same:
            same[0].update({k: v for k, v in row.items() if v is not None and same[0].get(k) is None})
        else:
            rows.append(row)
    cols = [c for c in args.columns if any(r.get(c) is not None for r in rows)]

    def fmt(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, float) else ("" if v is None else str(v))

    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines))
    return ""


# ============================================================================ entry point
def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point ``sslpipe``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "pretrain":
        run_dir = pretrain(rest)
    elif command in ("linear", "knn", "kmeans"):
        run_dir = evaluate(command, rest)
    elif command == "report":
        report(rest)
        return
    else:
        print(f"sslpipe: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    from pytorch_lightning.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(run_dir, flush=True)


if __name__ == "__main__":
    main()
