"""Weighted k-nearest-neighbour classification on cosine similarity (Wu et al., 2018), searched with faiss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sslpipe.evaluation.metrics import topk_accuracy


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Class scores ``(Q, num_classes)``: each of the k most cosine-similar training samples votes ``exp(s/T)``.

    The exact inner-product search on L2-normalised features runs in faiss (``IndexFlatIP``).
    """
    import faiss

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1).numpy().astype(np.float32)
    queries = F.normalize(query_features.float(), dim=1).numpy().astype(np.float32)
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank)
    sims, idx = index.search(queries, k)
    sims_t = torch.from_numpy(sims)
    neighbour_labels = train_labels.long()[torch.from_numpy(idx).long()]  # (Q, k)
    weights = (sims_t / temperature).exp()
    scores = torch.zeros(queries.shape[0], num_classes)
    scores.scatter_add_(1, neighbour_labels, weights)
    return scores


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """kNN top-1/top-5 of ``val`` against the ``train`` bank (percent)."""
    scores = knn_predict(train_features, train_labels, val_features, num_classes, k, temperature)
    acc = topk_accuracy(scores, val_labels.long(), (1, 5))
    return {"knn_top1": 100 * acc[1], "knn_top5": 100 * acc[5]}
