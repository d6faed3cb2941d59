"""k-means clustering of frozen features (faiss), scored against the labels with NMI, ARI and cluster accuracy."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


def kmeans_assign(
    features: torch.Tensor, num_clusters: int, niter: int = 50, nredo: int = 3, seed: int = 0
) -> np.ndarray:
    """Cluster L2-normalised ``features`` into ``num_clusters`` with faiss (spherical k-means); return assignments."""
    import faiss

    if num_clusters < 2:
        raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
    x = F.normalize(features.float(), dim=1).numpy().astype(np.float32)
    km = faiss.Kmeans(x.shape[1], num_clusters, niter=niter, nredo=nredo, seed=seed, spherical=True, verbose=False)
    km.train(x)
    return km.index.search(x, 1)[1][:, 0]


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy under the best one-to-one cluster-to-class matching (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    n = int(max(labels.max(), clusters.max())) + 1
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (clusters, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(labels))


def clustering_scores(
    features: torch.Tensor, labels: torch.Tensor, num_clusters: Optional[int] = None, seed: int = 0
) -> dict[str, float]:
    """k-means on ``features`` scored against ``labels``: NMI, ARI and Hungarian accuracy (percent).

    Args:
        num_clusters: k; ``None`` uses the number of distinct labels.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    y = labels.long().numpy()
    keep = y >= 0
    k = num_clusters or len(np.unique(y[keep]))
    assign = kmeans_assign(features[torch.from_numpy(keep)], k, seed=seed)
    y = y[keep]
    return {
        "kmeans_nmi": 100 * float(normalized_mutual_info_score(y, assign)),
        "kmeans_ari": 100 * float(adjusted_rand_score(y, assign)),
        "kmeans_accuracy": 100 * cluster_accuracy(y, assign),
    }
