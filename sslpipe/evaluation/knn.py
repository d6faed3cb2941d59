"""Weighted k-nearest-neighbour classification on cosine similarity (Wu et al., 2018).

Two exact searches with bounded memory: chunked matrix products + top-k in torch (on the GPU when there
is one; it also runs on the CPU) and faiss's flat inner-product index on the CPU. Neither builds a
queries x bank matrix: ImageNet's 50k x 1.28M would be 256 GB.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from sslpipe.evaluation.metrics import topk_accuracy

KnnBackend = Literal["auto", "torch", "faiss"]


@torch.no_grad()
def _inverse_norms(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``1 / ||x_i||`` in fp32, computed chunk by chunk (``x`` may be fp16)."""
    out = torch.empty(len(x), dtype=torch.float32, device=x.device)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = torch.linalg.vector_norm(x[start : start + chunk].float(), dim=1)
    return 1.0 / out.clamp_min(1e-12)


@torch.no_grad()
def knn_search_torch(
    bank: torch.Tensor, queries: torch.Tensor, k: int, query_chunk: int = 4096, bank_chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` cosine neighbours of each query in ``bank``: ``(similarities, indices)``, each ``(Q, k)``.

    Runs on the device ``bank`` lives on; ``bank`` and ``queries`` may be fp16 (each chunk is upcast and the
    products run in fp32). Per query chunk, each bank chunk contributes its own top-k, merged into the running
    top-k with a stable sort, so among equal similarities the earlier bank chunk wins. Peak extra memory:
    ``query_chunk x bank_chunk`` similarities plus one fp32 bank chunk.
    """
    k = min(k, len(bank))
    bank_inv = _inverse_norms(bank, bank_chunk)
    all_sims = torch.empty(len(queries), k, dtype=torch.float32)
    all_idx = torch.empty(len(queries), k, dtype=torch.long)
    for qs in range(0, len(queries), query_chunk):
        q = F.normalize(queries[qs : qs + query_chunk].to(bank.device).float(), dim=1)
        best = torch.full((len(q), k), float("-inf"), device=bank.device)
        best_idx = torch.zeros((len(q), k), dtype=torch.long, device=bank.device)
        for bs in range(0, len(bank), bank_chunk):
            sims = (q @ bank[bs : bs + bank_chunk].float().T) * bank_inv[bs : bs + bank_chunk]
            top, top_idx = sims.topk(min(k, sims.shape[1]), dim=1)
            merged = torch.cat([best, top], dim=1)
            merged_idx = torch.cat([best_idx, top_idx + bs], dim=1)
            order = merged.sort(dim=1, descending=True, stable=True).indices[:, :k]
            best, best_idx = merged.gather(1, order), merged_idx.gather(1, order)
        all_sims[qs : qs + len(q)] = best.cpu()
        all_idx[qs : qs + len(q)] = best_idx.cpu()
    return all_sims, all_idx


def knn_search_faiss(
    bank: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` cosine neighbours with faiss ``IndexFlatIP`` on the CPU: ``(similarities, indices)``.

    The bank is normalised and added chunk by chunk (faiss keeps one fp32 copy); queries are searched in chunks.
    """
    import faiss

    k = min(k, len(bank))
    index = faiss.IndexFlatIP(bank.shape[1])
    for start in range(0, len(bank), chunk):
        index.add(F.normalize(bank[start : start + chunk].cpu().float(), dim=1).numpy().astype(np.float32))
    sims, idx = [], []
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start : start + chunk].cpu().float(), dim=1).numpy().astype(np.float32)
        s, i = index.search(q, k)
        sims.append(torch.from_numpy(s))
        idx.append(torch.from_numpy(i).long())
    return torch.cat(sims), torch.cat(idx)


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    backend: KnnBackend = "auto",
    device: torch.device | str = "cpu",
    query_chunk: int = 4096,
    bank_chunk: int = 65536,
) -> torch.Tensor:
    """Class scores ``(Q, num_classes)`` on the CPU: each of the k most cosine-similar bank samples votes ``exp(s/T)``.

    Args:
        backend: ``torch`` (chunked matmul + top-k on ``device``), ``faiss`` (CPU) or ``auto`` (torch on a
            GPU, faiss otherwise).
        device: where the torch search runs; the bank is moved there once (kept in its dtype, e.g. fp16).
        query_chunk, bank_chunk: chunk sizes of the torch search (memory: their product in fp32).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
    device = torch.device(device)
    if backend == "faiss" or (backend == "auto" and device.type != "cuda"):
        sims, idx = knn_search_faiss(train_features, query_features, k, bank_chunk)
    else:
        sims, idx = knn_search_torch(train_features.to(device), query_features, k, query_chunk, bank_chunk)
    neighbour_labels = train_labels.long().cpu()[idx]  # (Q, k)
    scores = torch.zeros(len(query_features), num_classes)
    scores.scatter_add_(1, neighbour_labels, (sims / temperature).exp())
    return scores


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    backend: KnnBackend = "auto",
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """kNN top-1/top-5 of ``val`` against the ``train`` bank (percent); ``backend`` as in :func:`knn_predict`."""
    scores = knn_predict(train_features, train_labels, val_features, num_classes, k, temperature, backend, device)
    acc = topk_accuracy(scores, val_labels.long(), (1, 5))
    return {"knn_top1": 100 * acc[1], "knn_top5": 100 * acc[5]}
