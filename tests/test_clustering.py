import numpy as np
import torch

from sslpipe.evaluation.clustering import cluster_accuracy, clustering_scores


def test_cluster_accuracy_matches_best_permutation_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    clusters = np.array([2, 2, 1, 0, 0, 1, 1, 1])  # 2->0 (2 right), 0->1 (2 right), 1->2 (3 right)
    # Written out: the best one-to-one matching gets 7 of 8 (the third image sits in class 2's cluster).
    assert cluster_accuracy(labels, clusters) == 7 / 8


def test_kmeans_recovers_separated_directions():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(16)[:4] * 10
    labels = torch.arange(4).repeat_interleave(50)
    feats = centres[labels] + 0.3 * torch.randn(200, 16, generator=g)
    scores = clustering_scores(feats, labels, num_clusters=4)
    assert scores["kmeans_nmi"] > 99 and scores["kmeans_accuracy"] == 100.0


def test_kmeans_on_noise_scores_near_chance():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(300, 16, generator=g), torch.randint(0, 3, (300,), generator=g)
    scores = clustering_scores(feats, labels, num_clusters=3)
    assert scores["kmeans_nmi"] < 10 and scores["kmeans_accuracy"] < 50
