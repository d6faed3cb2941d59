"""Feature extraction from a frozen backbone (sharded over the ranks of a distributed run), cached on disk in fp16.

ImageNet-1k's 1.28 M training images at 2048 features are 10.5 GB in fp32 and 5.2 GB in fp16, which keeps
the precision every probe needs (the features of a trained backbone sit far inside fp16's range; each probe
upcasts per batch). The cache key holds the checkpoint's *content* hash, so a retrained checkpoint written
to the same path with the same size never reuses stale features, and a copied one reuses them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from sslpipe.distributed import is_distributed, rank, world_size
from sslpipe.progress import progress

FP16_MAX = torch.finfo(torch.float16).max
# Cache layout version: bumped when what a cache file holds changes (v2: fp16 features, int32 labels).
CACHE_FORMAT = 2


def autocast_for(device: torch.device, precision: str):
    """An autocast context for a Lightning-style precision string (``32-true``, ``bf16-mixed``, ``16-mixed``)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


@torch.no_grad()
def feature_batches(
    model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", precision: str = "32-true"
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield ``(features, *rest)`` per batch of ``loader``: fp32 ``(B, D)`` features on ``device``, the rest as loaded.

    The model runs in eval mode (BatchNorm uses its running statistics and never updates them; dropout is
    off) without gradients; its mode is restored when the iteration ends.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    try:
        for images, *rest in loader:
            with autocast_for(device, precision):
                f = model(images.to(device, non_blocking=True))
            yield (f.float().flatten(1), *rest)
    finally:
        model.train(was_training)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, rank + 2 world, ...`` of a dataset of ``size``: disjoint shards, no padding.

    ``DistributedSampler`` pads the shards to equal length with repeated images, which would put duplicates
    into the features; here shard sizes differ by at most one and the gather removes nothing.
    """

    def __init__(self, size: int, shard: int, num_shards: int) -> None:
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
        self.size, self.shard, self.num_shards = size, shard, num_shards

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.shard, self.size, self.num_shards))

    def __len__(self) -> int:
        return len(range(self.shard, self.size, self.num_shards))


def _shard_loader(loader: DataLoader, shard: int, num_shards: int) -> DataLoader:
    """The same loader (batch size, workers, collate) over this rank's shard of its dataset."""
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=ShardSampler(len(loader.dataset), shard, num_shards),  # type: ignore[arg-type]
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )


@torch.no_grad()
def _gather_strided(local: torch.Tensor, total: int, dst: Optional[int], chunk_bytes: int = 256 << 20) -> torch.Tensor:
    """Reassemble rows sharded by :class:`ShardSampler` (rank r holds rows r, r+W, ...) in dataset order.

    Rows travel in chunks (bounded memory on every rank): each rank pads its shard to the longest shard's
    length, so every ``all_gather`` moves equal shapes; row j of rank r is dataset row ``r + W*j``, so the
    gathered ``(j, r)`` grid read row-major is dataset order, and the padding lands past ``total``.
    Returns the full ``(total, ...)`` tensor on rank ``dst`` (every rank if ``dst`` is None), and an empty
    ``(0, ...)`` one on the others.
    """
    world, me = world_size(), rank()
    longest = math.ceil(total / world)
    comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    row_shape = local.shape[1:]
    row_bytes = max(1, local.element_size() * math.prod(row_shape))
    rows_per_chunk = max(1, chunk_bytes // (row_bytes * world))
    keep = dst is None or dst == me
    out = torch.empty((longest, world, *row_shape), dtype=local.dtype) if keep else None
    for start in range(0, longest, rows_per_chunk):
        stop = min(longest, start + rows_per_chunk)
        piece = torch.zeros((stop - start, *row_shape), dtype=local.dtype)
        mine = local[start:stop]
        piece[: len(mine)] = mine
        if comm_device is not None:
            piece = piece.to(comm_device)
        parts = [torch.empty_like(piece) for _ in range(world)]
        dist.all_gather(parts, piece.contiguous())
        if out is not None:
            out[start:stop] = torch.stack(parts, dim=1).cpu()
    if out is None:
        return torch.empty((0, *row_shape), dtype=local.dtype)
    return out.reshape(longest * world, *row_shape)[:total]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    precision: str = "32-true",
    desc: str = "features",
    dtype: torch.dtype = torch.float16,
    dst: Optional[int] = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (eval mode) over ``loader`` of ``(image, label)``; return ``(features, int32 labels)`` on the CPU.

    Features are stored as ``dtype`` (fp16 by default, halving memory; all probes upcast per batch); if
    any value exceeds fp16's range the whole set is kept in fp32 instead, with a warning.

    Under ``torch.distributed`` every rank extracts a disjoint shard of the (unshuffled) loader's dataset
    and the rows are gathered in dataset order onto rank ``dst`` (``None``: every rank); the other ranks
    get empty ``(0, D)`` tensors. The loader's own sampler is replaced, so pass an unshuffled loader.
    """
    device = torch.device(device)
    distributed = is_distributed()
    if distributed:
        loader = _shard_loader(loader, rank(), world_size())
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    keep_dtype = dtype
    for f, y, *_ in feature_batches(model, progress(loader, desc=desc) if rank() == 0 else loader, device, precision):
        if keep_dtype == torch.float16 and bool(f.abs().amax() > FP16_MAX):  # eval loop, not a training step
            keep_dtype = torch.float32
            feats = [x.float() for x in feats]
        feats.append(f.to(keep_dtype).cpu())
        labels.append(torch.as_tensor(y).to(torch.int32).cpu())
    if feats:
        local_f, local_y = torch.cat(feats), torch.cat(labels)
    else:  # a rank whose shard is empty (more ranks than images); the width comes with the gather below
        local_f, local_y = torch.empty(0, 0, dtype=keep_dtype), torch.empty(0, dtype=torch.int32)
    if distributed:
        # Every rank must agree on the stored dtype and the width before gathering.
        flags = torch.tensor(
            [float(keep_dtype == torch.float32), float(local_f.shape[1] if len(local_f) else 0)],
            device=torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu",
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        keep_dtype = torch.float32 if flags[0].item() > 0 else keep_dtype
        width = int(flags[1].item())
        local_f = local_f.to(keep_dtype) if len(local_f) else torch.empty(0, width, dtype=keep_dtype)
        total = len(loader.dataset)  # type: ignore[arg-type]
        local_f = _gather_strided(local_f, total, dst)
        local_y = _gather_strided(local_y, total, dst)
    if keep_dtype != dtype:
        warnings.warn(
            f"{desc}: feature values exceed the fp16 range ({FP16_MAX:.0f}); stored in fp32 instead", stacklevel=2
        )
    return local_f, local_y


# ------------------------------------------------------------------ the cache
_DIGESTS: dict[tuple[str, int, int], str] = {}
_DIGEST_MEMO = "checkpoint_digests.json"


def file_digest(path: str, memo_dir: Optional[str] = None, chunk_bytes: int = 16 << 20) -> str:
    """SHA-256 of the file at ``path``, read in chunks; remembered by ``(absolute path, mtime_ns, size)``.

    The memo lives in this process and, when ``memo_dir`` is given, in ``<memo_dir>/checkpoint_digests.json``,
    so a multi-GB checkpoint is hashed once, not at every evaluation. A file rewritten in place with the
    same size and an identical mtime (nanoseconds) would be missed by the memo; checkpoint writers do not
    preserve mtimes.
    """
    st = os.stat(path)
    memo_key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if memo_key in _DIGESTS:
        return _DIGESTS[memo_key]
    memo_file = os.path.join(memo_dir, _DIGEST_MEMO) if memo_dir else None
    text_key = "|".join(str(part) for part in memo_key)
    on_disk: dict[str, str] = {}
    if memo_file and os.path.exists(memo_file):
        try:
            with open(memo_file) as f:
                on_disk = json.load(f)
        except (OSError, ValueError):
            on_disk = {}  # a damaged memo only costs a re-hash
    digest = on_disk.get(text_key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk_bytes):
                h.update(block)
        digest = h.hexdigest()
        if memo_file:
            on_disk[text_key] = digest
            os.makedirs(memo_dir, exist_ok=True)  # type: ignore[arg-type]
            tmp = f"{memo_file}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(on_disk, f, indent=1, sort_keys=True)
            os.replace(tmp, memo_file)
    _DIGESTS[memo_key] = digest
    return digest


def cache_key(**parts: object) -> str:
    """A short stable hash of the things that determine a feature set (checkpoint, data, transform)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def feature_cache_key(checkpoint: str, memo_dir: Optional[str] = None, **parts: object) -> str:
    """The cache key of the features of ``checkpoint``: its content hash (not its path or mtime) plus ``parts``."""
    return cache_key(checkpoint_sha256=file_digest(checkpoint, memo_dir), cache_format=CACHE_FORMAT, **parts)


def cached_features(
    cache_dir: Optional[str], key: str, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``<cache_dir>/<key>.pt`` if present, else ``compute()`` and save it there (``cache_dir`` None: no cache).

    Under ``torch.distributed`` rank 0 decides whether the file exists and tells the others (so all of them
    take part in a sharded ``compute`` or none does); only rank 0 reads and writes the file, the other ranks
    return ``compute()``'s output, or empty tensors when the cache was hit.
    """
    if cache_dir is None:
        return compute()
    path = os.path.join(cache_dir, f"{key}.pt")
    hit = [os.path.exists(path)]
    if is_distributed():
        dist.broadcast_object_list(hit, src=0)
    if hit[0]:
        if rank() != 0:
            return torch.empty(0, 0, dtype=torch.float16), torch.empty(0, dtype=torch.int32)
        data = torch.load(path, map_location="cpu", weights_only=True)
        return data["features"], data["labels"]
    features, labels = compute()
    if rank() == 0:
        _save(path, {"features": features, "labels": labels})
    return features, labels


def _save(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
