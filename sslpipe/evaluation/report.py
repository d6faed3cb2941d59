"""``sslpipe report RUN_DIR [RUN_DIR ...] [--output DIR]``: what runs learned, as ``report.md`` beside PNG plots.

For every run directory:

* its ``metrics.json`` values in one comparison table (also printed);
* training curves from its CSV log (``csv/metrics.csv``): loss, learning rate, online probe, the training
  energies, the ``diag/*`` diagnostics; several runs are overlaid in one figure;
* for a pretraining run (a ``checkpoints/`` folder): histograms of positive- and negative-pair energies
  (``-cos`` of L2-normalised backbone features; positives: two views of one validation image, negatives:
  views of two different images) for the checkpoint *next to its random-init twin* (same architecture and
  hyper-parameters, standard init seeded with ``--seed``), so the gap training opened is visible;
* a 2-D embedding of the validation features coloured by class: PCA always, t-SNE (scikit-learn), UMAP
  when ``umap-learn`` is installed.

The images and views are :class:`~sslpipe.evaluation.samples.DiagnosticImages`, the sample the
``RepresentationDiagnostics`` callback measures during training. ``report.json`` holds every number the
report states; ``--save_features`` also keeps the features behind the plots (``features-<run>.pt``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

REPORT_COLUMNS = [
    "run",
    "method",
    "dataset",
    "epochs",
    "train_images_per_second",
    "online_linear_top1",
    "rankme",
    "linear_top1",
    "linear_top5",
    "knn_top1",
    "knn_top5",
    "kmeans_nmi",
    "kmeans_accuracy",
]
# Column headings of the table (metrics.json names otherwise).
HEADINGS = {
    "train_images_per_second": "images/s",
    "online_linear_top1": "online probe top-1 %",
    "linear_top1": "linear top-1 %",
    "linear_top5": "linear top-5 %",
    "knn_top1": "kNN top-1 %",
    "knn_top5": "kNN top-5 %",
    "kmeans_nmi": "k-means NMI",
    "kmeans_accuracy": "k-means acc. %",
}
EMBEDDINGS = ("pca", "tsne", "umap")


# ------------------------------------------------------------------------------------------ metrics table
def read_run_metrics(run: str) -> dict[str, Any]:
    """``metrics.json`` of a run directory (or the file itself), with ``run``: the directory's name."""
    from sslpipe.errors import UserError

    path = run if run.endswith(".json") else os.path.join(run, "metrics.json")
    if not os.path.exists(path):
        raise UserError(f"no metrics.json at {path!r}: pass run directories printed by sslpipe commands")
    with open(path) as f:
        row = json.load(f)
    row["run"] = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return row


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)


def metrics_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = REPORT_COLUMNS) -> str:
    """A Markdown table of ``rows`` (one per run) over the ``columns`` that some row has."""
    cols = [c for c in columns if any(r.get(c) is not None for r in rows)]
    table = [[HEADINGS.get(c, c) for c in cols]] + [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ training curves
def read_csv_log(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every logged series of ``<run_dir>/csv/metrics.csv`` as ``name -> [(step, value), ...]`` (empty if none)."""
    path = os.path.join(run_dir, "csv", "metrics.csv")
    series: dict[str, list[tuple[int, float]]] = {}
    if not os.path.exists(path):
        return series
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for name, value in row.items():
                if name in ("step", "epoch") or value in (None, ""):
                    continue
                series.setdefault(name, []).append((step, float(value)))
    return series


# (panel title, y label, [(series name or regex, legend label)], scale): one panel per entry that has data.
CURVE_PANELS: list[tuple[str, str, list[tuple[str, str]], float]] = [
    ("self-supervised loss", "loss", [("train/loss", "train loss (step)"), ("train/loss_epoch", "epoch mean")], 1),
    ("learning rate", "lr", [(r"lr-[^/]+(/pg1)?$", "lr")], 1),
    ("online linear probe (val)", "top-1 %", [("val/online_linear_top1", "top-1")], 100),
    (
        "training energies (-cos, projector)",
        "energy",
        [("train/energy_pos", "positive"), ("train/energy_neg", "negative")],
        1,
    ),
    ("RankMe (diag, val sample)", "effective rank", [("diag/rankme", "RankMe")], 1),
    (
        "alignment / uniformity (diag)",
        "value",
        [("diag/alignment", "alignment (lower: closer pairs)"), ("diag/uniformity", "uniformity (lower: spread)")],
        1,
    ),
    (
        "energies of backbone features (diag)",
        "energy",
        [("diag/energy_pos", "positive"), ("diag/energy_neg", "negative")],
        1,
    ),
]


def _find_series(log: dict[str, list[tuple[int, float]]], pattern: str) -> Optional[list[tuple[int, float]]]:
    if pattern in log:
        return log[pattern]
    matches = sorted(name for name in log if re.fullmatch(pattern, name))
    return log[matches[0]] if matches else None


def plot_curves(logs: Sequence[tuple[str, dict[str, list[tuple[int, float]]]]], path: str) -> list[str]:
    """Training curves of one or several runs (``(label, read_csv_log(...))``), overlaid; returns the panel titles."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = [p for p in CURVE_PANELS if any(_find_series(log, s) for _, log in logs for s, _ in p[2])]
    if not panels:
        return []
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    several = len(logs) > 1
    for ax, (title, ylabel, series, scale) in zip(axes.flat, panels):
        drawn: list[tuple[str, str]] = []  # (style, series name) drawn in this panel
        for r, (_, log) in enumerate(logs):
            for s, (pattern, name) in enumerate(series):
                points = _find_series(log, pattern)
                if not points:
                    continue
                steps, values = zip(*points)
                # One run: a colour per series. Several: a colour per run (figure legend), a line style per series.
                colour = colours[(r if several else s) % len(colours)]
                style = styles[s % len(styles)] if several else "-"
                marker = "o" if len(points) < 15 else None
                ax.plot(steps, [v * scale for v in values], style, color=colour, marker=marker, ms=4, label=name)
                if (style, name) not in drawn:
                    drawn.append((style, name))
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not several:
            ax.legend(fontsize=8)
        elif len(drawn) > 1:  # line styles name the series; colours name the runs in the figure legend
            ax.legend(
                [Line2D([], [], color="black", ls=style) for style, _ in drawn], [n for _, n in drawn], fontsize=8
            )
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if several:
        handles = [Line2D([], [], color=colours[r % len(colours)], lw=2) for r in range(len(logs))]
        fig.legend(handles, [label for label, _ in logs], loc="upper center", ncol=min(3, len(logs)), fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight() * math.ceil(len(logs) / 3)))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [p[0] for p in panels]


# ------------------------------------------------------------------------------------------ energies and embedding
@dataclass
class RunFeatures:
    """Features of a run's checkpoint and of its random-init twin on the diagnostic sample."""

    checkpoint: str
    split: str
    pair_source: str
    indices: list[int]
    classes: Optional[list[str]]
    models: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # "trained"/"random" -> embed_sample


def _views_from_config(run_dir: str) -> Any:
    """The run's ``data.views`` recipe rebuilt from its ``config.yaml`` (``None`` when it names none)."""
    import importlib

    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        views = ((yaml.safe_load(f) or {}).get("data") or {}).get("views")
    if not isinstance(views, dict) or "class_path" not in views:
        return None
    module, _, name = views["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**(views.get("init_args") or {}))


def run_features(run_dir: str, checkpoint_name: str = "last", num_images: int = 512, seed: int = 0) -> RunFeatures:
    """Embed the run's validation sample with its checkpoint and with the random-init twin (``torch.manual_seed(seed)``
    then :func:`~sslpipe.checkpoints.build_method` with ``random_init``), in fp32 on a GPU when there is one."""
    from sslpipe.checkpoints import build_method, load_checkpoint
    from sslpipe.data import SSLDataModule
    from sslpipe.evaluation.samples import DiagnosticImages, embed_sample

    path = os.path.join(run_dir, "checkpoints", f"{checkpoint_name}.ckpt")
    checkpoint = load_checkpoint(path)
    hp = {k: v for k, v in (checkpoint.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    hp.update(views=_views_from_config(run_dir), num_workers=0, persistent_workers=False)
    data = SSLDataModule(**hp)
    images = DiagnosticImages.from_datamodule(data, num_images, seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = getattr(images.clean, "classes", None)
    out = RunFeatures(path, images.split, images.pair_source, images.indices, list(classes) if classes else None)
    trained = build_method(checkpoint, source=path)
    torch.manual_seed(seed)
    random_twin = build_method(checkpoint, random_init=True, source=path)
    for name, model in (("trained", trained), ("random", random_twin)):
        out.models[name] = embed_sample(model, images, device, "32-true", batch_size=256)
    return out


def energy_summary(features: dict[str, torch.Tensor]) -> dict[str, float]:
    """The diagnostics of one model's sample features (:func:`representation_metrics`) as floats."""
    from sslpipe.evaluation.diagnostics import representation_metrics

    metrics = representation_metrics(features["clean"], features["view1"], features["view2"])
    return {k: float(v) for k, v in metrics.items()}


def plot_energy_histograms(run: RunFeatures, path: str, title: str = "") -> dict[str, dict[str, float]]:
    """Positive- vs negative-pair energy histograms, checkpoint next to random init; returns the means plotted."""
    import matplotlib.pyplot as plt
    import numpy as np

    from sslpipe.evaluation.diagnostics import pair_energies

    energies = {name: pair_energies(f["view1"], f["view2"]) for name, f in run.models.items()}
    values = torch.cat([torch.cat(pair) for pair in energies.values()])
    low, high = float(values.min()), float(values.max())
    pad = 0.03 * max(high - low, 1e-3)
    bins = np.linspace(low - pad, high + pad, 61)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    means: dict[str, dict[str, float]] = {}
    titles = {"trained": "pretrained checkpoint", "random": "random init (same architecture)"}
    for ax, (name, (pos, neg)) in zip(axes, energies.items()):
        pos_mean, neg_mean = float(pos.mean()), float(neg.mean())
        means[name] = {"energy_pos_mean": pos_mean, "energy_neg_mean": neg_mean, "energy_gap": neg_mean - pos_mean}
        for pairs, mean, colour, text in (
            (neg, neg_mean, "tab:red", "negative"),
            (pos, pos_mean, "tab:blue", "positive"),
        ):
            ax.hist(pairs.numpy(), bins=bins, density=True, color=colour, alpha=0.25)
            ax.hist(pairs.numpy(), bins=bins, density=True, color=colour, histtype="step", lw=1.6)
            ax.axvline(mean, color=colour, ls="--", lw=1.8, label=f"{text} pairs ({len(pairs)}): mean {mean:+.3f}")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
        ax.set_title(f"{titles[name]}: gap {neg_mean - pos_mean:.3f}")
        ax.set_xlabel("energy = -cos(f(x), f(y))   (low: similar)")
        ax.set_ylabel("density")
        ax.legend(fontsize=8, loc="upper center", framealpha=0.9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return means


def _two_d(x: "Any", method: str, seed: int) -> tuple[Any, str]:
    """Rows of ``x`` (numpy, L2-normalised features) in 2-D by ``method``; and a note for the panel title."""
    import numpy as np

    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    if method == "pca":
        share = (s[:2] ** 2).sum() / max((s**2).sum(), 1e-12)
        return centred @ vt[:2].T, f"{100 * share:.0f}% of variance"
    reduced = centred @ vt[: min(50, vt.shape[0])].T  # the usual PCA step before t-SNE/UMAP
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
        return tsne.fit_transform(reduced), f"perplexity {perplexity:.0f}"
    import umap  # type: ignore[import-not-found]

    return umap.UMAP(n_components=2, random_state=seed).fit_transform(reduced), "UMAP"


def available_embeddings(requested: Sequence[str]) -> list[str]:
    """``requested`` 2-D embeddings that can run here (UMAP only when ``umap-learn`` imports)."""
    out = []
    for method in requested:
        if method not in EMBEDDINGS:
            from sslpipe.errors import ConfigError

            raise ConfigError(f"unknown embedding {method!r}: choose from {', '.join(EMBEDDINGS)}")
        if method == "umap":
            try:
                import umap  # type: ignore[import-not-found]  # noqa: F401
            except ImportError:
                continue
        out.append(method)
    return out


def plot_embeddings(run: RunFeatures, path: str, methods: Sequence[str], seed: int = 0) -> None:
    """2-D embeddings (rows: ``methods``) of the clean validation features, checkpoint vs random init, by class."""
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    names = list(run.models)
    fig, axes = plt.subplots(len(methods), len(names), figsize=(5.4 * len(names), 4.6 * len(methods)), squeeze=False)
    labels = run.models[names[0]]["labels"].numpy()
    classes = sorted(set(labels.tolist()))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    titles = {"trained": "pretrained", "random": "random init"}
    for row, method in enumerate(methods):
        for col, name in enumerate(names):
            x = F.normalize(run.models[name]["clean"].double(), dim=1).numpy()
            xy, note = _two_d(x, method, seed)
            ax = axes[row, col]
            for k, c in enumerate(classes):
                mask = labels == c
                text = "unlabelled" if c < 0 else (run.classes[c] if run.classes and c < len(run.classes) else str(c))
                colour = "grey" if c < 0 else cmap(k % cmap.N)
                ax.scatter(xy[mask, 0], xy[mask, 1], s=9, color=colour, label=text, alpha=0.8, linewidths=0)
            ax.set_title(f"{method.upper() if method != 'tsne' else 't-SNE'} - {titles[name]} ({note})", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    if len(classes) <= 20:
        handles, texts = axes[0, -1].get_legend_handles_labels()
        fig.legend(handles, texts, loc="center right", title="class", markerscale=2, fontsize=9)
        fig.tight_layout(rect=(0, 0, 0.92, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the report
def _diag_table(stats: dict[str, dict[str, float]]) -> str:
    rows = [
        ("positive-pair energy, mean", "energy_pos_mean"),
        ("negative-pair energy, mean", "energy_neg_mean"),
        ("gap (negative - positive)", "energy_gap"),
        ("alignment (alpha=2, lower: closer pairs)", "alignment"),
        ("uniformity (t=2, lower: more spread)", "uniformity"),
        ("RankMe (effective rank)", "rankme"),
        ("per-dimension std, mean", "std_mean"),
        ("per-dimension std, min", "std_min"),
    ]
    lines = ["| | pretrained | random init |", "|---|---:|---:|"]
    for text, key in rows:
        lines.append(f"| {text} | {stats['trained'][key]:.4f} | {stats['random'][key]:.4f} |")
    return "\n".join(lines)


def write_report(
    runs: Sequence[str],
    output: str,
    checkpoint: str = "last",
    num_images: int = 512,
    seed: int = 0,
    embeddings: Sequence[str] = EMBEDDINGS,
    columns: Sequence[str] = REPORT_COLUMNS,
    merge: bool = False,
    save_features: bool = False,
) -> dict[str, Any]:
    """Write ``<output>/report.md``, its PNGs and ``report.json`` for ``runs``; return the report.json content."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display

    methods = available_embeddings(embeddings)  # a bad name fails before any work
    os.makedirs(output, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for run in runs:
        row = read_run_metrics(run)
        same = [r for r in rows if merge and r.get("method") == row.get("method")]
        if same:
            same[0].update({k: v for k, v in row.items() if v is not None and same[0].get(k) is None})
        else:
            rows.append(row)
    table = metrics_table(rows, columns)
    summary: dict[str, Any] = {"runs": [], "table": rows}
    md = [f"# sslpipe report\n\n{len(runs)} run(s); generated {time.strftime('%Y-%m-%d %H:%M')}.\n"]
    md += [
        "## Metrics\n",
        table,
        "\nFrom each run's `metrics.json` (`rankme`: the last diagnostics of training, at its precision).\n",
    ]

    run_dirs = [run if not run.endswith(".json") else os.path.dirname(run) for run in runs]
    several = len(run_dirs) > 1
    names = [os.path.basename(os.path.abspath(r)) for r in run_dirs]
    logs = [(f"run{i + 1}: {n}" if several else n, read_csv_log(r)) for i, (n, r) in enumerate(zip(names, run_dirs))]
    logs = [(label, log) for label, log in logs if log]
    if logs:
        panels = plot_curves(logs, os.path.join(output, "curves.png"))
        overlaid = " (runs overlaid)" if len(logs) > 1 else ""
        md += [f"## Training curves{overlaid}\n", "![training curves](curves.png)\n"]
        md += [f"Panels: {', '.join(panels)}. x: optimiser step; `diag/*` are measured every few epochs.\n"]

    for i, run_dir in enumerate(run_dirs):
        name = os.path.basename(os.path.abspath(run_dir))
        ckpt = os.path.join(run_dir, "checkpoints", f"{checkpoint}.ckpt")
        if not os.path.exists(ckpt):
            continue  # an evaluation run (linear, knn): its numbers are in the table
        prefix = f"run{i + 1}-" if several else ""
        feats = run_features(run_dir, checkpoint, num_images, seed)
        stats = {model: energy_summary(f) for model, f in feats.models.items()}
        hist_file, emb_file = f"{prefix}energies.png", f"{prefix}embedding.png"
        means = plot_energy_histograms(feats, os.path.join(output, hist_file), title=name)
        for model in stats:
            stats[model].update(means[model])
        n = len(feats.indices)
        md += [
            f"## {name}\n",
            f"Checkpoint `{os.path.relpath(feats.checkpoint, run_dir)}`; {n} images of the `{feats.split}` split; "
            f"features: the backbone's, L2-normalised; positive pairs: {feats.pair_source}; negative pairs: views "
            f"of two different images ({n * (n - 1)} pairs). The random-init twin has the same architecture "
            f"(seed {seed}).\n",
            f"### Energies: pretrained vs random init\n\n![energy histograms]({hist_file})\n",
            f"Training moved the mean positive energy from {means['random']['energy_pos_mean']:+.3f} to "
            f"{means['trained']['energy_pos_mean']:+.3f} and the mean negative energy from "
            f"{means['random']['energy_neg_mean']:+.3f} to {means['trained']['energy_neg_mean']:+.3f}: the gap went "
            f"from {means['random']['energy_gap']:.3f} to {means['trained']['energy_gap']:.3f}.\n",
            _diag_table(stats) + "\n",
        ]
        entry: dict[str, Any] = {"run": name, "checkpoint": feats.checkpoint, "images": n, **{"stats": stats}}
        if methods:
            plot_embeddings(feats, os.path.join(output, emb_file), methods, seed)
            shown = ", ".join("t-SNE" if m == "tsne" else m.upper() for m in methods)
            md += [f"### 2-D embedding of the validation features ({shown})\n\n![embedding]({emb_file})\n"]
            entry["embedding_png"] = emb_file
        entry["energies_png"] = hist_file
        if save_features:
            feature_file = f"features-{prefix or 'run-'}{name}.pt"
            torch.save(
                {"indices": feats.indices, "seed": seed, "checkpoint": feats.checkpoint, **feats.models},
                os.path.join(output, feature_file),
            )
            entry["features"] = feature_file
        summary["runs"].append(entry)

    with open(os.path.join(output, "report.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(output, "report.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary


def main(argv: Sequence[str]) -> Optional[str]:
    """Print the runs' metrics table and write the report (``report.md`` + PNGs); returns the output folder."""
    import argparse

    ap = argparse.ArgumentParser(prog="sslpipe report", description="report.md with plots for run directories.")
    ap.add_argument("runs", nargs="+", help="run directories (or metrics.json files)")
    ap.add_argument("--output", default=None, help="folder for report.md (default: <run>/report, or report-<time>)")
    ap.add_argument("--checkpoint", default="last", help="checkpoint name in <run>/checkpoints (last, best, best_rank)")
    ap.add_argument("--num_images", type=int, default=512, help="validation images for energies and embeddings")
    ap.add_argument("--seed", type=int, default=0, help="seed of the image sample, its views and the random init")
    ap.add_argument("--embeddings", nargs="*", default=list(EMBEDDINGS), help="2-D embeddings: pca tsne umap")
    ap.add_argument("--columns", nargs="*", default=REPORT_COLUMNS, help="metrics to show, in order")
    ap.add_argument("--merge", action="store_true", help="one row per method (later runs fill in missing values)")
    ap.add_argument("--save_features", action="store_true", help="also keep the features behind the plots (.pt)")
    args = ap.parse_args(list(argv))
    output = args.output
    if output is None:
        first = args.runs[0] if not args.runs[0].endswith(".json") else os.path.dirname(args.runs[0])
        if len(args.runs) == 1:
            output = os.path.join(first, "report")
        else:
            output = os.path.join(os.path.dirname(os.path.abspath(first)), f"report-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = write_report(
        args.runs,
        output,
        checkpoint=args.checkpoint,
        num_images=args.num_images,
        seed=args.seed,
        embeddings=args.embeddings,
        columns=args.columns,
        merge=args.merge,
        save_features=args.save_features,
    )
    print(metrics_table(summary["table"], args.columns))
    return output
