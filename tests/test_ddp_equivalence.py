"""Every method is DDP-equivalent: two optimiser steps on 2 gloo ranks with half the batch each equal two steps on
one process with the whole batch, in loss, gradients, parameters and all state (queue, memory bank, momentum
encoders, PIRL's NCE normaliser, the online probe).

The DDP side does what Lightning's DDP strategy does: the LightningModule itself is wrapped in
``DistributedDataParallel`` (which honours ``_ddp_params_and_buffers_to_ignore`` and broadcasts the other
buffers before each forward), ``training_step`` runs inside the wrapper's forward (Lightning's forward
redirection), and the step goes through the module's own ``optimizer_step`` (optimiser step, then the momentum
encoders' EMA) with a closure that runs the forward and ``backward``, where DDP averages the gradients. The
online probe all-reduces its own. ``self.log`` is patched out; ``trainer`` is a stand-in with the step counter.
The single-process side runs the same steps on the whole batch without torch.distributed, on one thread as
each rank does (the same kernels on the same shapes: a noise floor of 3e-5 instead of 1e-3 for MoCo v3, whose
BatchNorms over 4 images amplify rounding). The optimiser is SGD with momentum for every method: it is
rank-local and the same on both sides, and AdamW would turn the 1e-9 rounding noise on coordinates whose true
gradient is 0 (the key part of an attention's qkv bias) into full-size steps of random sign.

Making the two setups compute the same function:

* BatchNorm statistics are per device. MoCo v2/v3 have split-BN: ``bn_splits=2`` on one process with batch 2B
  normalises exactly the two halves the two ranks normalise (queries, keys, predictor). Split-BN updates the
  running statistics twice per step where each rank updates once, so ``running_*``/``num_batches_tracked``
  (which the training-mode forward never reads) are left out of their state comparison. SimCLR and PIRL have no
  split option and SyncBatchNorm needs a GPU, so they run a ResNet-18 with GroupNorm (timm ``norm_layer``) and
  BatchNorm-free heads (SimCLR: a linear projector; PIRL's heads are linear). The masked models use a ViT
  (LayerNorm) and the online probe without its BatchNorm (``probe_batch_norm=False``; with it the probe
  normalises per rank, the one known non-equivalence, and only of the monitoring probe).
* Random draws. MoCo's shuffle-BN permutation is drawn by rank 0 and broadcast; the ranks get different random
  streams here (rank 0 the single process's), so a permutation that was not broadcast would show. PIRL draws one
  shared negative set per batch with ``randperm``; all processes share one stream, so each rank draws the set the
  single process draws. MAE/SimMIM masks and DAE noise are drawn per image: on the DDP side ``torch.rand`` and
  ``torch.randn`` are patched to draw for the whole global batch and return the rank's rows, which is exactly
  the single process's draw. (Real runs give each rank its own stream: equal in distribution, not bitwise.)

Run time: one spawn of 2 processes for all eight cases, tiny models on 16-px images.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterator

import pytest
import torch
from timm.layers import GroupNorm1

from sslpipe.methods import PIRL, DenoisingAutoencoder, MaskedAutoencoder, MoCoV2, MoCoV3, SimCLR, SimMIM
from sslpipe.optim import build_optimizer, param_groups
from tests.helpers import run_distributed

pytestmark = pytest.mark.distributed

WORLD = 2
LOCAL = 4  # images per rank; the single process sees WORLD * LOCAL
STEPS = 2
TOTAL_STEPS = 10  # the run length the schedules (MoCo v3's cosine momentum) see
LR = 0.5
SEED = 7

TINY = {"layers": [1, 1, 1, 1], "channels": (16, 32, 64, 128)}  # a 4-stage ResNet of 0.3 M parameters
RESNET_GN = dict(backbone="resnet18", backbone_kwargs={**TINY, "norm_layer": GroupNorm1}, image_size=16, num_classes=4)
RESNET_BN = dict(backbone="resnet18", backbone_kwargs=TINY, image_size=16, num_classes=4)
VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs={"patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 3},
    image_size=16,
    num_classes=4,
    probe_batch_norm=False,
)
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _pirl(form: str) -> Callable[[bool], Any]:
    return lambda ddp: PIRL(
        num_samples=24, num_negatives=10, tile_dim=8, proj_output_dim=16, loss_form=form, **RESNET_GN
    )


# name -> (build(ddp side?) -> method, views kind, one random stream for all processes?, state names left out)
CASES: dict[str, tuple[Callable[[bool], Any], str, bool, tuple[str, ...]]] = {
    "simclr": (lambda ddp: SimCLR(proj_num_layers=1, proj_output_dim=16, **RESNET_GN), "pair", False, ()),
    "moco_v2": (
        lambda ddp: MoCoV2(
            proj_hidden_dim=32,
            proj_output_dim=16,
            queue_size=12,
            shuffle_bn=True,
            bn_splits=1 if ddp else 2,
            **RESNET_BN,
        ),
        "pair",
        False,
        BN_STATS,
    ),
    "moco_v3": (
        lambda ddp: MoCoV3(
            proj_hidden_dim=32, proj_output_dim=16, pred_hidden_dim=32, bn_splits=1 if ddp else 2, **RESNET_BN
        ),
        "pair",
        False,
        BN_STATS,
    ),
    "pirl_nce": (_pirl("nce"), "jigsaw", True, ()),
    "pirl_infonce": (_pirl("infonce"), "jigsaw", True, ()),
    "mae": (lambda ddp: MaskedAutoencoder(decoder_dim=32, decoder_depth=1, decoder_heads=2, **VIT), "single", True, ()),
    "simmim": (lambda ddp: SimMIM(mask_block_size=1, **VIT), "single", True, ()),
    "dae": (lambda ddp: DenoisingAutoencoder(**VIT), "single", True, ()),
}


def global_batch(kind: str, step: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The step's whole batch ``(views, labels, indices)``, identical in every process."""
    g = torch.Generator().manual_seed(100 + step)
    n = WORLD * LOCAL
    images = torch.randn(n, 3, 16, 16, generator=g)
    if kind == "pair":
        views = [images, images + 0.3 * torch.randn(n, 3, 16, 16, generator=g)]
    elif kind == "jigsaw":
        views = [images, torch.randn(n, 9, 3, 8, 8, generator=g), torch.zeros(n, dtype=torch.long)]
    else:
        views = [images]
    labels = torch.tensor([0, 1, -1, 2, 3, -1, -1, 1])  # unlabeled rows, unequal labeled counts per rank
    return views, labels, torch.arange(n) + n * step


def local_batch(batch, rank: int):
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    views, labels, indices = batch
    return [v[rows] for v in views], labels[rows], indices[rows]


@contextlib.contextmanager
def global_batch_draws(rank: int) -> Iterator[None]:
    """``torch.rand``/``torch.randn`` of a per-image shape ``(LOCAL, ...)`` draw ``(WORLD * LOCAL, ...)`` and
    return this rank's rows: the draws of the single process, which sees the whole batch."""
    originals = {name: getattr(torch, name) for name in ("rand", "randn")}

    def global_draw(original):
        def draw(*size, **kwargs):
            shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
            if not shape or shape[0] != LOCAL:
                return original(*size, **kwargs)
            return original((WORLD * LOCAL, *shape[1:]), **kwargs)[rank * LOCAL : (rank + 1) * LOCAL]

        return draw

    for name, original in originals.items():
        setattr(torch, name, global_draw(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)


def train(name: str, rank: int, ddp: bool) -> dict[str, Any]:
    """Two steps of case ``name``: the whole batch (``ddp=False``) or this rank's half inside DDP."""
    build, kind, shared_stream, _ = CASES[name]
    torch.manual_seed(0)  # the same initial weights everywhere
    model = build(ddp)
    model.trainer = types.SimpleNamespace(global_step=0, estimated_stepping_batches=TOTAL_STEPS)
    model.log = lambda *args, **kwargs: None
    hp = model.hparams
    groups = param_groups(model, hp.weight_decay, hp.exclude_bias_norm, prefix_excluded=("probe.",))
    optimizer = build_optimizer("sgd", groups, lr=LR, momentum=hp.momentum)
    wrapper = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        wrapper = DistributedDataParallel(model)
    torch.manual_seed(SEED if shared_stream else SEED + 1000 * rank)  # rank 0's stream is the single process's
    draws = global_batch_draws(rank) if ddp and kind == "single" else contextlib.nullcontext()
    losses, grads = [], []
    with draws:
        for step in range(STEPS):
            batch = global_batch(kind, step)
            batch = local_batch(batch, rank) if ddp else batch
            model.trainer.global_step = step

            def closure(batch=batch, step=step):
                loss = redirected_training_step(wrapper, model, batch, step)
                loss.backward()
                grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
                losses.append(loss.detach())
                return loss

            model.optimizer_step(0, step, optimizer, closure)
            optimizer.zero_grad(set_to_none=True)
    return {"losses": losses, "grads": grads, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def redirected_training_step(wrapper, model, batch, batch_idx: int) -> torch.Tensor:
    """``model.training_step`` called through ``wrapper``'s forward, as Lightning's strategies do (for DDP's hooks)."""
    if wrapper is model:
        return model.training_step(batch, batch_idx)
    original = model.forward

    def forward(*args, **kwargs):
        model.forward = original
        return model.training_step(*args, **kwargs)

    model.forward = forward
    try:
        return wrapper(batch, batch_idx)
    finally:
        model.forward = original


def _ranks_worker(rank: int, world: int) -> dict[str, dict]:
    return {name: train(name, rank, ddp=True) for name in CASES}


@pytest.fixture(scope="module")
def ddp_results() -> list[dict[str, dict]]:
    return run_distributed(_ranks_worker, WORLD)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (absolute when ``expected`` is 0); exact for integer tensors; NaN
    (PIRL's normaliser before or without its estimate) must sit in the same places."""
    if not expected.is_floating_point():
        return 0.0 if torch.equal(actual, expected) else float("inf")
    if not torch.equal(actual.isnan(), expected.isnan()):
        return float("inf")
    actual, expected = actual.nan_to_num(0.0), expected.nan_to_num(0.0)
    diff = torch.linalg.vector_norm((actual - expected).double())
    scale = torch.linalg.vector_norm(expected.double())
    return float(diff / scale) if scale > 0 else float(diff)


TOLERANCE = 2e-4  # rounding: at most 1.6e-5 measured (MoCo v3); every planted bug gives 1e-2 and more


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_with_half_batches_equal_one_process_with_the_whole_batch(name, ddp_results):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the ranks: the same kernels on the same shapes, a lower noise floor
    try:
        single = train(name, 0, ddp=False)
    finally:
        torch.set_num_threads(threads)
    excluded = CASES[name][3]
    for rank, result in enumerate(res[name] for res in ddp_results):
        for step in range(STEPS):
            mean_loss = torch.stack([res[name]["losses"][step] for res in ddp_results]).mean()
            assert relative_error(mean_loss, single["losses"][step]) < TOLERANCE, f"{name}: loss of step {step}"
            grads, expected = result["grads"][step], single["grads"][step]
            assert grads.keys() == expected.keys()
            for key, value in expected.items():
                err = relative_error(grads[key], value)
                assert err < TOLERANCE, f"{name} rank {rank} step {step}: gradient of {key} off by {err:.2e}"
        state = result["state"]
        assert state.keys() == single["state"].keys()
        for key, value in single["state"].items():
            if key.endswith(excluded):
                continue
            err = relative_error(state[key], value)
            assert err < TOLERANCE, f"{name} rank {rank}: {key} off by {err:.2e} after {STEPS} steps"
