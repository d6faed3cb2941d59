"""The contrastive core: direct and tiled forms against the definition written out one row and one negative at
a time (values, gradients into queries, keys, positives and log Z, statistics), with the excluded columns in
every block; rows without negatives; errors; no (N, M) tensor in the tiled form; two gloo ranks."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sslpipe.losses import (
    AUTO_BLOCK,
    AUTO_DIRECT_MAX_ENTRIES,
    batch_infonce_loss,
    contrastive_row_losses,
    infonce_loss,
    nt_xent_loss,
    resolve_block,
)
from tests.helpers import run_distributed


# ------------------------------------------------------------------------------------------------ the definition
def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    tau: float,
    positives: Optional[torch.Tensor] = None,
    pos_col: Optional[torch.Tensor] = None,
    exclude_col: Optional[torch.Tensor] = None,
    reduction: str = "softmax",
    log_z: Optional[torch.Tensor] = None,
    num_data: Optional[int] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-row losses (float64, differentiable) and statistics, one row and one negative at a time.

    softmax: -s_p/tau + log(exp(s_p/tau) + sum_j exp(s_j/tau)) with an explicit max shift;
    nce: log(1 + exp(c - s_p/tau)) + sum_j log(1 + exp(s_j/tau - c)), c = log Z + log(#negatives / |D|).
    The negatives of row i are the columns j of k with j != pos_col[i] and j != exclude_col[i].
    """
    losses, pos_cos, neg_cos, top1 = [], [], [], []
    units = [row / row.norm() for row in k]
    for i in range(len(q)):
        qi = q[i] / q[i].norm()
        partner = positives[i] / positives[i].norm() if positives is not None else units[int(pos_col[i])]
        s_pos = qi @ partner
        negs = [
            qi @ units[j]
            for j in range(len(k))
            if (pos_col is None or j != int(pos_col[i])) and (exclude_col is None or j != int(exclude_col[i]))
        ]
        if reduction == "softmax":
            terms = [s_pos / tau] + [s / tau for s in negs]
            top = max(float(t.detach()) for t in terms)
            loss = -s_pos / tau + top + torch.log(sum(torch.exp(t - top) for t in terms))
        else:
            shift = log_z + math.log(len(negs) / num_data)
            loss = torch.log1p(torch.exp(shift - s_pos / tau))
            for s in negs:
                loss = loss + torch.log1p(torch.exp(s / tau - shift))
        losses.append(loss)
        pos_cos.append(float(s_pos.detach()))
        neg_cos.extend(float(s.detach()) for s in negs)
        top1.append(pos_cos[-1] > max(neg_cos[len(neg_cos) - len(negs) :], default=-math.inf))
    mean_pos, mean_neg = sum(pos_cos) / len(pos_cos), sum(neg_cos) / len(neg_cos)
    stats = {
        "energy_pos": -mean_pos,
        "energy_neg": -mean_neg,
        "energy_gap": mean_pos - mean_neg,
        "pretext_top1": sum(top1) / len(top1),
    }
    return torch.stack(losses), stats


# (N, M, d, tau, block): N and M not multiples of the block; the last one is a single tile.
SHAPES = [(13, 29, 8, 0.1, 4), (23, 37, 5, 0.5, 7), (17, 17, 4, 0.07, 5), (6, 50, 16, 1.0, 64)]
MODES = ["positives", "positives+exclude", "pos_col", "pos_col+exclude"]


def _problem(n: int, m: int, d: int, mode: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = torch.randn(m, d, generator=g, dtype=torch.float64)
    pos_col = torch.randint(0, m, (n,), generator=g)
    positives = None
    if mode.startswith("positives"):
        positives, pos_col = torch.randn(n, d, generator=g, dtype=torch.float64), None
    else:
        k[pos_col] = k[pos_col] + 0.7 * q  # make some positives win, so top-1 is neither 0 nor 1
    exclude_col = None
    if mode.endswith("+exclude"):
        exclude_col = torch.randint(-1, m, (n,), generator=g)  # -1: this row excludes nothing
        exclude_col[0] = m + 3  # outside [0, M): nothing either
        if pos_col is not None:
            exclude_col[1] = pos_col[1]  # the positive itself: nothing more is excluded
    return {"q": q, "k": k, "positives": positives, "pos_col": pos_col, "exclude_col": exclude_col}


def _leaves(problem: dict, dtype: torch.dtype) -> dict:
    out = dict(problem)
    for name in ("q", "k", "positives"):
        if problem[name] is not None:
            out[name] = problem[name].detach().to(dtype).clone().requires_grad_()
    return out


@pytest.mark.parametrize("reduction", ["softmax", "nce"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{s[0]}-M{s[1]}-b{s[4]}" for s in SHAPES])
def test_direct_and_tiled_match_the_definition(shape, mode, reduction):
    n, m, d, tau, block = shape
    problem = _problem(n, m, d, mode, seed=n * m)
    # Per-row weights: the backward must use each row's own incoming gradient, not their mean.
    weights = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    nce = {"num_data": 1000} if reduction == "nce" else {}

    ref_in = _leaves(problem, torch.float64)
    ref_log_z = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    ref_rows, ref_stats = reference(
        ref_in["q"], ref_in["k"], tau, ref_in["positives"], problem["pos_col"], problem["exclude_col"],
        reduction, ref_log_z, nce.get("num_data"),
    )  # fmt: skip
    (ref_rows * weights).sum().backward()
    assert 0.0 < ref_stats["pretext_top1"] < 1.0 or mode.startswith("positives")

    for form in (None, block):
        got_in = _leaves(problem, torch.float32)
        log_z = torch.tensor(2.3, requires_grad=True)
        rows, stats = contrastive_row_losses(
            got_in["q"], got_in["k"], tau, positives=got_in["positives"], pos_col=problem["pos_col"],
            exclude_col=problem["exclude_col"], reduction=reduction, nce_log_z=log_z,
            nce_num_data=nce.get("num_data"), block=form, return_stats=True,
        )  # fmt: skip
        assert rows.shape == (n,) and rows.dtype == torch.float32
        torch.testing.assert_close(rows.double(), ref_rows.detach(), rtol=1e-5, atol=1e-5, msg=f"block={form}")
        (rows * weights.float()).sum().backward()
        for name in ("q", "k", "positives"):
            if problem[name] is not None:
                torch.testing.assert_close(
                    got_in[name].grad.double(), ref_in[name].grad, rtol=1e-4, atol=1e-5, msg=f"d{name}, block={form}"
                )
        if reduction == "nce":
            assert log_z.grad.item() == pytest.approx(ref_log_z.grad.item(), rel=1e-4, abs=1e-5)
        for key, value in ref_stats.items():
            assert stats[key].shape == () and not stats[key].requires_grad
            assert stats[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), (key, form)


@pytest.mark.parametrize("block", [None, 1, 2])
def test_rows_without_negatives_have_zero_softmax_loss_and_finite_gradients(block):
    g = torch.Generator().manual_seed(4)
    # One key, which is every row's positive: no negatives at all.
    q = torch.randn(3, 4, generator=g, requires_grad=True)
    k = torch.randn(1, 4, generator=g, requires_grad=True)
    rows = contrastive_row_losses(q, k, 0.2, pos_col=torch.zeros(3, dtype=torch.long), block=block)
    torch.testing.assert_close(rows, torch.zeros(3), rtol=0, atol=1e-6)
    rows.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    # NT-Xent of a single image: its two views are each other's positive, nothing else is left.
    z1 = torch.randn(1, 4, generator=g, requires_grad=True)
    z2 = torch.randn(1, 4, generator=g, requires_grad=True)
    loss = nt_xent_loss(z1, z2, 0.1, block=block)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_tiled_backward_under_bf16_autocast_matches_fp32():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(9, 6, generator=g).bfloat16(), torch.randn(9, 6, generator=g).bfloat16()
    queue = torch.randn(11, 6, generator=g)
    grads = []
    for block, ctx in ((None, torch.autocast("cpu", enabled=False)), (4, torch.autocast("cpu", dtype=torch.bfloat16))):
        a = q.float().requires_grad_() if block is None else q.clone().requires_grad_()
        with ctx:
            loss = infonce_loss(a, k, queue, 0.1, block=block)
        assert loss.dtype == torch.float32
        loss.backward()
        grads.append(a.grad.float())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-4)  # only the bf16 rounding of a.grad


# ------------------------------------------------------------------------------------------------ choice, errors
def test_resolve_block_chooses_by_size_and_rejects_bad_values():
    side = int(math.isqrt(AUTO_DIRECT_MAX_ENTRIES))
    assert resolve_block("auto", side, side) is None
    assert resolve_block("auto", side + 1, side) == AUTO_BLOCK
    assert resolve_block(None, 10**6, 10**6) is None
    assert resolve_block(256, 4, 4) == 256
    for bad in (0, -8, True, "tiled", 2.5):
        with pytest.raises(ValueError, match="contrastive block must be null"):
            resolve_block(bad, 4, 4)


def test_errors_name_the_bad_value():
    q, k = torch.randn(4, 3), torch.randn(6, 3)
    cols = torch.arange(4)
    with pytest.raises(ValueError, match=r"temperature must be > 0, got -0\.5"):
        contrastive_row_losses(q, k, -0.5, pos_col=cols)
    with pytest.raises(ValueError, match=r"same width d, got shapes \(4, 3\) and \(6, 2\)"):
        contrastive_row_losses(q, torch.randn(6, 2), 0.1, pos_col=cols)
    with pytest.raises(ValueError, match="either as vectors"):
        contrastive_row_losses(q, k, 0.1)
    with pytest.raises(ValueError, match="either as vectors"):
        contrastive_row_losses(q, k, 0.1, positives=q, pos_col=cols)
    with pytest.raises(ValueError, match=r"exclude_col must be an integer tensor of shape \(N,\) = \(4,\)"):
        contrastive_row_losses(q, k, 0.1, pos_col=cols, exclude_col=torch.zeros(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs nce_log_z"):
        contrastive_row_losses(q, k, 0.1, positives=q, reduction="nce")
    with pytest.raises(ValueError, match="q and k must be"):
        batch_infonce_loss(q, k)
    with pytest.raises(ValueError, match="contrastive block"):
        nt_xent_loss(q, q, block="big")


# ------------------------------------------------------------------------------------------------ memory
class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


@pytest.mark.parametrize("reduction", ["softmax", "nce"])
def test_tiled_form_never_creates_an_n_by_m_tensor(reduction):
    """Every tensor that any operator returns, in the forward and in the backward, is observed by a
    dispatch mode (it sits below autograd, so the recomputation in the backward is seen too). The tiled
    form's largest must be a tile or an input-sized (rows x d) tensor; the direct form's is N x M, which
    shows that the probe sees the logits when they exist."""
    n, m, d, block = 32, 160, 2, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, d, generator=g, requires_grad=True)
    k = torch.randn(m, d, generator=g, requires_grad=True)
    args = {"pos_col": torch.randint(0, m, (n,), generator=g), "exclude_col": torch.randint(0, m, (n,), generator=g)}
    if reduction == "nce":
        args.update(nce_log_z=1.0, nce_num_data=1000)
    bound = max(block * block, n * d, m * d)
    assert bound * 8 <= n * m
    for form in (block, None):
        forward, backward = _LargestTensor(), _LargestTensor()
        with forward:
            loss, _ = contrastive_row_losses(q, k, 0.1, reduction=reduction, block=form, return_stats=True, **args)
            loss = loss.sum()
        with backward:
            loss.backward()
        assert backward.ops > 10  # the backward really ran under the probe
        if form is None:
            assert forward.largest >= n * m and backward.largest >= n * m
        else:
            assert forward.largest <= bound and backward.largest <= bound, (forward.largest, backward.largest)


# ------------------------------------------------------------------------------------------------ two gloo ranks
WORLD, N_LOCAL, DIM, TAU = 2, 5, 6, 0.3


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    z1 = torch.randn(WORLD * N_LOCAL, DIM, generator=g)
    q = torch.randn(WORLD * N_LOCAL, DIM, generator=g)
    return {
        "z1": z1,
        "z2": z1 + 0.6 * torch.randn(WORLD * N_LOCAL, DIM, generator=g),
        "q": q,
        "k": q + 0.8 * torch.randn(WORLD * N_LOCAL, DIM, generator=g),
    }


def _loss_grads(fn, a: torch.Tensor, b: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = fn(a, b, TAU, **kwargs)
    loss.backward()
    return {"loss": loss.detach(), "a": a.grad, "b": b.grad}


def _tiled_rank_worker(rank: int, world: int) -> dict:
    data, mine = _global_batch(), slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    return {  # blocks smaller than the gathered key set, and not dividing it
        "nt_xent": _loss_grads(nt_xent_loss, data["z1"][mine], data["z2"][mine], block=3),
        "batch_infonce": _loss_grads(batch_infonce_loss, data["q"][mine], data["k"][mine], block=4),
    }


@pytest.mark.distributed
def test_tiled_losses_on_two_gloo_ranks_match_the_single_process_global_batch():
    results = run_distributed(_tiled_rank_worker, WORLD)
    data = _global_batch()
    for name, fn, a, b in (
        ("nt_xent", nt_xent_loss, data["z1"], data["z2"]),
        ("batch_infonce", batch_infonce_loss, data["q"], data["k"]),
    ):
        full = _loss_grads(fn, a, b, block=None)  # one process, direct form, no torch.distributed
        mean = torch.stack([res[name]["loss"] for res in results]).mean()
        assert mean.item() == pytest.approx(full["loss"].item(), rel=1e-6)
        for r, res in enumerate(results):
            # rank r holds world x the global-mean loss's gradient of its slice (DDP's averaging divides it back);
            # for batch_infonce "b" is the keys: their gradient comes back from the other rank's queries.
            mine = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
            for grad in ("a", "b"):
                torch.testing.assert_close(res[name][grad] / WORLD, full[grad][mine], rtol=1e-5, atol=1e-7)
