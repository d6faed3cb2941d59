"""Feature extraction from a frozen backbone, cached on disk so probes and kNN share one pass."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from sslpipe.progress import progress


def autocast_for(device: torch.device, precision: str):
    """An autocast context for a Lightning-style precision string (``32-true``, ``bf16-mixed``, ``16-mixed``)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    precision: str = "32-true",
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (in eval mode) over ``loader`` of ``(image, label)`` and return fp32 features and labels."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    feats, labels = [], []
    for images, y in progress(loader, desc=desc):
        with autocast_for(device, precision):
            f = model(images.to(device, non_blocking=True))
        feats.append(f.float().flatten(1).cpu())
        labels.append(torch.as_tensor(y).cpu())
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def cache_key(**parts: object) -> str:
    """A short stable hash of the things that determine a feature set (checkpoint, data, transform)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def cached_features(
    cache_dir: Optional[str], key: str, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``<cache_dir>/<key>.pt`` if present, else ``compute()`` and save it there (``cache_dir`` None: no cache)."""
    if cache_dir is None:
        return compute()
    path = os.path.join(cache_dir, f"{key}.pt")
    if os.path.exists(path):
        data = torch.load(path, map_location="cpu")
        return data["features"], data["labels"]
    features, labels = compute()
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"features": features, "labels": labels}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return features, labels
