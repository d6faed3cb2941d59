"""``sslpipe linear | knn | kmeans``: evaluate a pretrained backbone on frozen, cached features.

The method, its hyper-parameters and the data settings come from the checkpoint, so ``--checkpoint``
alone is enough; a pretraining YAML (``--config``) or dotted flags change the data. Each probe's options
(``--linear.*``, ``--knn.*``, ``--kmeans.*``) are read from its function's signature: defaults live there.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1), every rank extracts a shard of the features, rank 0 gathers
them, caches them and runs the probe; the other ranks end after the extraction.
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
    "encoder",
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
        "--random_init",
        type=bool,
        default=False,
        help="Evaluate the checkpoint's architecture at a standard random init (no zeroed residual branches).",
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
    parser.add_argument("--diagnostics", type=Optional[dict], default=None, help="Ignored (pretraining only).")
    parser.add_class_arguments(RunOptions, "run")
    parser.add_class_arguments(SSLDataModule, "data", fail_untyped=False)
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False)
    parser.add_function_arguments(train_linear_probe, "linear", skip=_DATA_ARGS)
    parser.add_function_arguments(knn_classify, "knn", skip=_DATA_ARGS)
    parser.add_function_arguments(clustering_scores, "kmeans", skip=_DATA_ARGS)
    return parser


def _checkpoint_data_defaults(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The pretraining run's data settings, as defaults of ``--data.*``."""
    hp = checkpoint.get("datamodule_hyper_parameters") or {}
    return {f"data.{k}": v for k, v in hp.items() if k != "views" and not k.startswith("_")}


def _is_main() -> bool:
    from sslpipe.distributed import rank

    return rank() == 0


def _init_distributed(use_cuda: bool) -> torch.device:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); return this rank's device."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if not use_cuda:
        return torch.device("cpu")
    return torch.device("cuda", local_rank if dist.is_initialized() else torch.cuda.current_device())


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

    from sslpipe.checkpoints import RANDOM_INIT_SCHEME, build_method, load_checkpoint
    from sslpipe.data import SSLDataModule
    from sslpipe.errors import DataError
    from sslpipe.evaluation.features import cached_features, extract_features, feature_cache_key
    from sslpipe.runs import make_run_dir

    parser = _parser(command)
    cfg = parser.parse_args(list(argv))
    checkpoint = load_checkpoint(cfg.checkpoint)  # read once, safely: data defaults and the model
    parser.set_defaults(_checkpoint_data_defaults(checkpoint))
    cfg = parser.parse_args(list(argv))  # again, now with the checkpoint's data settings as defaults

    seed = 0 if cfg.seed_everything in (True, False) else int(cfg.seed_everything)
    seed_everything(seed, workers=True, verbose=False)
    model = build_method(checkpoint, random_init=cfg.random_init, source=cfg.checkpoint)
    method = model.method_label() + ("-random" if cfg.random_init else "")
    data = SSLDataModule(**{k: v for k, v in cfg.data.as_dict().items() if k != "views"})
    if data.num_classes == 0:
        raise DataError(
            "this checkpoint was pretrained on unlabeled data; pass --data.eval_root DIR with train/ and val/ "
            f"class folders (or --data.dataset/--data.root of a labelled dataset). data.root: {data.root}"
        )
    use_cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    device = _init_distributed(use_cuda)
    run_dir = make_run_dir(cfg.trainer.default_root_dir, [command, method, data.dataset], cfg.run.name)
    if _is_main():
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(parser.dump(cfg, skip_none=False))

    precision = str(cfg.trainer.precision or "32-true")
    cache_dir = cfg.feature_cache or os.path.join(os.path.dirname(os.path.abspath(cfg.checkpoint)), "..", "features")
    if cfg.feature_cache is not None and cfg.feature_cache.lower() == "none":  # None (unset): the default folder
        cache_dir = None

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        loader = data.eval_dataloader(split)
        if cache_dir is None:
            return extract_features(model, loader, device, precision, desc=f"{split} features")
        key = ""  # rank 0 alone reads and writes the cache, and hashes the checkpoint for its key
        if _is_main():
            key = feature_cache_key(
                cfg.checkpoint,
                memo_dir=cache_dir,
                random_init=RANDOM_INIT_SCHEME if cfg.random_init else False,
                seed=seed,
                split=split,
                dataset=data.dataset,
                root=os.path.abspath(data.labelled_root),
                image_size=data.image_size,
                precision=precision,
            )
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


def linear(argv: Sequence[str]) -> Optional[str]:
    """Linear probe: (lr, weight decay) chosen on held-out training features, evaluated once on val.

    With ``--linear.augment true`` the probes train on random-resized crops through the frozen backbone
    (computed on the fly); the cached centre-crop features still give the standardisation, the held-out
    scores and the validation scores.
    """
    from sslpipe.evaluation.linear import FrozenEncoder, train_linear_probe

    ev = _setup("linear", argv)
    (xtr, ytr), (xva, yva) = ev.features("train"), ev.features("val")
    if not _is_main():
        return None  # the probe runs on rank 0
    opts = ev.cfg.linear.as_dict()
    encoder = FrozenEncoder(ev.model, ev.data, ev.device, str(ev.cfg.trainer.precision or "32-true"))
    result = train_linear_probe(
        xtr, ytr, xva, yva, ev.data.num_classes, seed=ev.seed, device=ev.device, encoder=encoder, **opts
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
        "linear_augment": opts["augment"],
    }
    return _finish(ev, int(xva.shape[1]), metrics)


def knn(argv: Sequence[str]) -> Optional[str]:
    """Weighted kNN of val against the train features (chunked torch search on a GPU, faiss on the CPU)."""
    from sslpipe.evaluation.knn import knn_classify

    ev = _setup("knn", argv)
    (xtr, ytr), (xva, yva) = ev.features("train"), ev.features("val")
    if not _is_main():
        return None  # the search runs on rank 0
    opts = ev.cfg.knn.as_dict()
    metrics = knn_classify(xtr, ytr, xva, yva, ev.data.num_classes, device=ev.device, **opts)
    print(f"kNN ({opts}): top-1 {metrics['knn_top1']:.2f}%  top-5 {metrics['knn_top5']:.2f}%")
    return _finish(ev, int(xva.shape[1]), {**metrics, **{f"knn_{k}": v for k, v in opts.items()}})


def kmeans(argv: Sequence[str]) -> Optional[str]:
    """k-means of the val features (k = the number of classes unless set), scored against the labels."""
    from sslpipe.evaluation.clustering import clustering_scores

    ev = _setup("kmeans", argv)
    xva, yva = ev.features("val")
    if not _is_main():
        return None  # clustering runs on rank 0
    opts = ev.cfg.kmeans.as_dict()
    opts["num_clusters"] = opts.get("num_clusters") or ev.data.num_classes
    metrics = clustering_scores(xva, yva, seed=ev.seed, **opts)
    print(
        f"k-means (k={opts['num_clusters']}) on val: NMI {metrics['kmeans_nmi']:.2f}  ARI {metrics['kmeans_ari']:.2f}  "
        f"accuracy {metrics['kmeans_accuracy']:.2f}%"
    )
    return _finish(ev, int(xva.shape[1]), {**metrics, "kmeans_clusters": opts["num_clusters"]})
