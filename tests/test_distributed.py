"""NT-Xent under 2-process DDP on the CPU (gloo) equals the single-process loss on the global batch.

The single-process reference needs no torch.distributed at all, so it is an independent code path:
with negatives gathered from every rank, the mean of the per-rank losses and the DDP-averaged
gradients must reproduce it. A detached ``all_gather`` keeps the forward value but loses the
gradient that flows to the other ranks' embeddings; the last test shows that it is wrong.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from sslpipe.distributed import broadcast_, gather_no_grad, rank, world_size
from sslpipe.losses import nt_xent_loss
from tests.helpers import run_distributed

WORLD = 2
N_PER_RANK = 4
DIM = 8
TAU = 0.2

pytestmark = pytest.mark.distributed


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The same (WORLD * N_PER_RANK, DIM) pair of view embeddings on every process."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(WORLD * N_PER_RANK, DIM, generator=g)
    z2 = z1 + 0.7 * torch.randn(WORLD * N_PER_RANK, DIM, generator=g)
    return z1, z2


def global_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Raw inputs of the two views for the model test (an encoder maps them to embeddings)."""
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(WORLD * N_PER_RANK, 5, generator=g)
    x2 = x1 + 0.5 * torch.randn(WORLD * N_PER_RANK, 5, generator=g)
    return x1, x2


def rank_slice(r: int) -> slice:
    return slice(r * N_PER_RANK, (r + 1) * N_PER_RANK)


def single_process(z1: torch.Tensor, z2: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Loss and gradients of the global batch computed in one process (no torch.distributed)."""
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = nt_xent_loss(a, b, TAU)
    loss.backward()
    return loss.item(), a.grad, b.grad


def _leaf_grads(z1: torch.Tensor, z2: torch.Tensor, gather: bool) -> dict[str, torch.Tensor]:
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = nt_xent_loss(a, b, TAU, gather=gather)
    loss.backward()
    return {"loss": loss.detach(), "g1": a.grad, "g2": b.grad}


# ------------------------------------------------------------------ workers (module level: pickled by spawn)
def _leaf_worker(r: int, world: int) -> dict:
    z1, z2 = global_batch()
    mine = rank_slice(r)
    return {
        "rank": rank(),
        "world_size": world_size(),
        "gathered": gather_no_grad(torch.tensor([10 * r + 1])),
        "broadcast": broadcast_(torch.full((2,), float(r)), src=1),
        "gather": _leaf_grads(z1[mine], z2[mine], gather=True),
        "local": _leaf_grads(z1[mine], z2[mine], gather=False),
    }


def _encoder() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(5, DIM)


def _ddp_worker(r: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    x1, x2 = global_inputs()
    mine = rank_slice(r)
    out = {}
    for gather in (True, False):
        model = DistributedDataParallel(_encoder())
        z = model(torch.cat([x1[mine], x2[mine]]))  # one pass over both views, as SimCLR does
        loss = nt_xent_loss(z[:N_PER_RANK], z[N_PER_RANK:], TAU, gather=gather)
        loss.backward()  # DDP all-reduces and averages the parameter gradients here
        out[gather] = {"loss": loss.detach(), "weight": model.module.weight.grad, "bias": model.module.bias.grad}
    return out


def _detached_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The naive gather: every block, this rank's included, is cut from the graph."""
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def _detached_all_gather_keep_local(tensor: torch.Tensor) -> torch.Tensor:
    """The common half-fix: put the local tensor back in its slot, so only this rank's own loss reaches it."""
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    out[dist.get_rank()] = tensor
    return torch.cat(out)


def _detached_worker(r: int, world: int) -> dict:
    import sslpipe.losses.nt_xent as module

    z1, z2 = global_batch()
    mine = rank_slice(r)
    out = {}
    for name, gather_fn in (("detached", _detached_all_gather), ("keep_local", _detached_all_gather_keep_local)):
        module.gather_with_grad = gather_fn  # this process only; it exits right after
        out[name] = _leaf_grads(z1[mine], z2[mine], gather=True)
    return out


def _all_workers(r: int, world: int) -> dict:
    # One spawn for every check: starting two Python processes with torch costs far more than the checks.
    return {"leaf": _leaf_worker(r, world), "ddp": _ddp_worker(r, world), "detached": _detached_worker(r, world)}


@pytest.fixture(scope="module")
def rank_results() -> list[dict]:
    """Each rank's results of the three workers (the monkey-patching worker runs last)."""
    return run_distributed(_all_workers, WORLD)


# ------------------------------------------------------------------ tests
def test_leaf_embeddings_match_single_process(rank_results):
    results = [res["leaf"] for res in rank_results]
    z1, z2 = global_batch()
    loss, g1, g2 = single_process(z1, z2)

    assert [res["rank"] for res in results] == [0, 1]
    assert all(res["world_size"] == WORLD for res in results)
    assert all(res["gathered"].tolist() == [1, 11] for res in results)
    assert all(res["broadcast"].tolist() == [1.0, 1.0] for res in results)

    # Gathered negatives: the ranks' mean loss is the global-batch loss, and rank r's gradient is
    # world_size x the global loss's gradient of its slice (DDP's averaging divides it back).
    assert torch.stack([res["gather"]["loss"] for res in results]).mean().item() == pytest.approx(loss, rel=1e-6)
    for r, res in enumerate(results):
        torch.testing.assert_close(res["gather"]["g1"] / WORLD, g1[rank_slice(r)], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["gather"]["g2"] / WORLD, g2[rank_slice(r)], rtol=1e-5, atol=1e-7)

    # gather=False: each rank only sees its own negatives, i.e. the single-process loss of its slice,
    # which is not the global-batch loss.
    local_mean = torch.stack([res["local"]["loss"] for res in results]).mean().item()
    for r, res in enumerate(results):
        own, own_g1, _ = single_process(z1[rank_slice(r)], z2[rank_slice(r)])
        assert res["local"]["loss"].item() == pytest.approx(own, rel=1e-6)
        torch.testing.assert_close(res["local"]["g1"], own_g1)
    assert abs(local_mean - loss) > 1e-2
    assert not torch.allclose(results[0]["local"]["g1"] / WORLD, g1[rank_slice(0)], rtol=1e-3, atol=1e-5)


def test_ddp_model_gradients_match_single_process(rank_results):
    results = [res["ddp"] for res in rank_results]
    x1, x2 = global_inputs()
    model = _encoder()
    z = model(torch.cat([x1, x2]))
    loss = nt_xent_loss(z[: len(x1)], z[len(x1) :], TAU)
    loss.backward()

    for res in results:
        torch.testing.assert_close(res[True]["weight"], model.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res[True]["bias"], model.bias.grad, rtol=1e-5, atol=1e-7)
    assert torch.stack([res[True]["loss"] for res in results]).mean().item() == pytest.approx(loss.item(), rel=1e-6)

    # Local negatives give another loss and other gradients: the test would catch a silent fallback.
    local_mean = torch.stack([res[False]["loss"] for res in results]).mean().item()
    assert abs(local_mean - loss.item()) > 1e-2
    assert not torch.allclose(results[0][False]["weight"], model.weight.grad, rtol=1e-3, atol=1e-5)


def test_detached_all_gather_gives_wrong_gradients(rank_results):
    """Why gather_with_grad exists: a plain all_gather has the right loss value but the wrong gradient."""
    results = [res["detached"] for res in rank_results]
    z1, z2 = global_batch()
    loss, g1, g2 = single_process(z1, z2)
    for variant in ("detached", "keep_local"):
        # the forward pass is identical ...
        mean_loss = torch.stack([res[variant]["loss"] for res in results]).mean().item()
        assert mean_loss == pytest.approx(loss, rel=1e-6)
        # ... but the negatives that live on the other rank send no gradient back to their owner
        for r, res in enumerate(results):
            grad = torch.cat([res[variant]["g1"], res[variant]["g2"]]) / WORLD
            expected = torch.cat([g1[rank_slice(r)], g2[rank_slice(r)]])
            assert not torch.allclose(grad, expected, rtol=1e-3, atol=1e-5), variant
