"""``sslpipe linear | knn | kmeans``: evaluate a pretrained backbone on frozen, cached features.

The method, its hyper-parameters and the data settings come from the checkpoint, so ``--checkpoint``
alone is enough; a pretraining YAML (``--config``) or dotted flags change the data. Each probe's options
(``--linear.*``, ``--knn.*``, ``--kmeans.*``) are read from its function's signature: defaults live there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

# Arguments of the probe functions that the command fills in itself (features, labels, classes, device).
_DATA_ARGS = {
    "train_features",
    "train_labels",
    "val_features",
    "val_labels",
    "features",
    "labels",
    "num_classes",
    "seed",
    "device",
}


def _parser(command: str):
    from jsonargparse import ActionConfigFile, ArgumentParser
    from pytorch_lightning import Trainer

    from sslpipe.data import SSLDataModule
    from sslpipe.evaluation.clustering import clustering_scores
    from sslpipe.evaluation.knn import knn_classify
    from sslpipe.evaluation.linear import train_linear_probe
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
    parser.add_argument("--model", type=Optional[dict], default=None, help="Ignored (the checkpoint defines it).")
    parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="Ignored.")
    parser.add_class_arguments(RunOptions, "run")
    parser.add_class_arguments(SSLDataModule, "data", fail_untyped=False)
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False)
    parser.add_function_arguments(train_linear_probe, "linear", skip=_DATA_ARGS)
    parser.add_function_arguments(knn_classify, "knn", skip=_DATA_ARGS)
    parser.add_function_arguments(clustering_scores, "kmeans", skip=_DATA_ARGS)
    return parser


def _checkpoint_data_defaults(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found; pass --checkpoint <run dir>/checkpoints/last.ckpt")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = ckpt.get("datamodule_hyper_parameters") or {}
    return {f"data.{k}": v for k, v in hp.items() if k != "views" and not k.startswith("_")}


@dataclass
class _Evaluation:
    """What every evaluation command sets up: parsed config, model, data, device, run directory, features."""

    cfg: Any
    model: torch.nn.Module
    method: str
    data: Any
    device: torch.device
    seed: int
    run_dir: str
    features: Callable[[str], tuple[torch.Tensor, torch.Tensor]]


def _setup(command: str, argv: Sequence[str]) -> _Evaluation:
    from pytorch_lightning import seed_everything

    from sslpipe.data import SSLDataModule
    from sslpipe.errors import DataError
    from sslpipe.evaluation.features import cache_key, cached_features, extract_features
    from sslpipe.methods import load_method
    from sslpipe.runs import make_run_dir

    parser = _parser(command)
    cfg = parser.parse_args(list(argv))
    parser.set_defaults(_checkpoint_data_defaults(cfg.checkpoint))
    cfg = parser.parse_args(list(argv))  # again, now with the checkpoint's data settings as defaults

    seed = 0 if cfg.seed_everything in (True, False) else int(cfg.seed_everything)
    seed_everything(seed, workers=True, verbose=False)
    model = load_method(cfg.checkpoint, random_init=cfg.random_init)
    method = model.method_label(dict(model.hparams)) + ("-random" if cfg.random_init else "")
    data = SSLDataModule(**{k: v for k, v in cfg.data.as_dict().items() if k != "views"})
    if data.num_classes == 0:
        raise DataError(
            "this checkpoint was pretrained on unlabeled data; pass --data.eval_root DIR with train/ and val/ "
            f"class folders (or --data.dataset/--data.root of a labelled dataset). data.root: {data.root}"
        )
    run_dir = make_run_dir(cfg.trainer.default_root_dir, [command, method, data.dataset], cfg.run.name)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(parser.dump(cfg, skip_none=False))

    use_cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if use_cuda else "cpu")
    precision = str(cfg.trainer.precision or "32-true")
    cache_dir = cfg.feature_cache or os.path.join(os.path.dirname(os.path.abspath(cfg.checkpoint)), "..", "features")
    if cfg.feature_cache is not None and cfg.feature_cache.lower() == "none":  # None (unset): the default folder
        cache_dir = None
    stat = os.stat(cfg.checkpoint)

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = cache_key(
            checkpoint=os.path.abspath(cfg.checkpoint),
            mtime=stat.st_mtime_ns,
            size=stat.st_size,
            random_init=cfg.random_init,
            seed=seed,
            split=split,
            dataset=data.dataset,
            root=os.path.abspath(data.labelled_root),
            image_size=data.image_size,
            precision=precision,
        )
        loader = data.eval_dataloader(split)
        return cached_features(
            cache_dir, key, lambda: extract_features(model, loader, device, precision, desc=f"{split} features")
        )

    return _Evaluation(cfg, model, method, data, device, seed, run_dir, features)


def _finish(ev: _Evaluation, feature_dim: int, metrics: dict[str, Any]) -> str:
    from sslpipe.callbacks import write_metrics

    common = {
        "method": ev.method,
        "dataset": ev.data.dataset,
        "checkpoint": os.path.abspath(ev.cfg.checkpoint),
        "random_init": ev.cfg.random_init,
        "feature_dim": feature_dim,
    }
    write_metrics(ev.run_dir, {**common, **metrics})
    return ev.run_dir


def linear(argv: Sequence[str]) -> str:
    """Linear probe: (lr, weight decay) chosen on held-out training features, evaluated once on val."""
    from sslpipe.evaluation.linear import train_linear_probe

    ev = _setup("linear", argv)
    (xtr, ytr), (xva, yva) = ev.features("train"), ev.features("val")
    result = train_linear_probe(
        xtr, ytr, xva, yva, ev.data.num_classes, seed=ev.seed, device=ev.device, **ev.cfg.linear.as_dict()
    )
    print(
        f"linear probe: top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  (lr {result.lr}, wd {result.weight_decay})"
    )
    metrics = {
        "linear_top1": result.top1,
        "linear_top5": result.top5,
        "linear_lr": result.lr,
        "linear_weight_decay": result.weight_decay,
        "linear_sweep": result.sweep,
    }
    return _finish(ev, int(xva.shape[1]), metrics)


def knn(argv: Sequence[str]) -> str:
    """Weighted kNN of val against the train features."""
    from sslpipe.evaluation.knn import knn_classify

    ev = _setup("knn", argv)
    (xtr, ytr), (xva, yva) = ev.features("train"), ev.features("val")
    opts = ev.cfg.knn.as_dict()
    metrics = knn_classify(xtr, ytr, xva, yva, ev.data.num_classes, **opts)
    print(f"kNN ({opts}): top-1 {metrics['knn_top1']:.2f}%  top-5 {metrics['knn_top5']:.2f}%")
    return _finish(ev, int(xva.shape[1]), {**metrics, **{f"knn_{k}": v for k, v in opts.items()}})


def kmeans(argv: Sequence[str]) -> str:
    """k-means of the val features (k = the number of classes unless set), scored against the labels."""
    from sslpipe.evaluation.clustering import clustering_scores

    ev = _setup("kmeans", argv)
    xva, yva = ev.features("val")
    opts = ev.cfg.kmeans.as_dict()
    opts["num_clusters"] = opts.get("num_clusters") or ev.data.num_classes
    metrics = clustering_scores(xva, yva, seed=ev.seed, **opts)
    print(
        f"k-means (k={opts['num_clusters']}) on val: NMI {metrics['kmeans_nmi']:.2f}  ARI {metrics['kmeans_ari']:.2f}  "
        f"accuracy {metrics['kmeans_accuracy']:.2f}%"
    )
    return _finish(ev, int(xva.shape[1]), {**metrics, "kmeans_clusters": opts["num_clusters"]})
