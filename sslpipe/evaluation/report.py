"""``sslpipe report``: runs' ``metrics.json`` as one Markdown table."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

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


def main(argv: Sequence[str]) -> Optional[str]:
    """Print a Markdown table of run directories' metrics (only the columns some run has).

    ``--merge`` folds runs of the same ``method`` into one row, so a pretraining run, its linear probe
    and its kNN evaluation read as one line.
    """

    import argparse

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
    return None
