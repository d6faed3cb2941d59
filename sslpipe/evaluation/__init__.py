"""Evaluation of frozen backbones: feature extraction (cached), linear probe, faiss kNN, diagnostics."""

from sslpipe.evaluation.features import cached_features, extract_features
from sslpipe.evaluation.knn import knn_classify, knn_predict
from sslpipe.evaluation.linear import LinearProbeResult, train_linear_probe
from sslpipe.evaluation.metrics import topk_accuracy

__all__ = [
    "LinearProbeResult",
    "cached_features",
    "extract_features",
    "knn_classify",
    "knn_predict",
    "topk_accuracy",
    "train_linear_probe",
]
