"""NT-Xent against a loop-by-loop computation of its definition (direct and tiled core), errors, bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch

from sslpipe.losses import nt_xent_loss


def nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """SimCLR's loss written out: for each of the 2N views i with positive p(i),
    -log( exp(s_ip / tau) / sum_{k != i} exp(s_ik / tau) ), averaged over the 2N anchors,
    with s the cosine similarity. Plain Python loops over float64 values."""
    views = [v.double() for v in torch.cat([z1, z2])]
    n = z1.shape[0]

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))

    total = 0.0
    for i in range(2 * n):
        p = i + n if i < n else i - n
        positive = math.exp(cos(views[i], views[p]) / temperature)
        denominator = 0.0
        for k in range(2 * n):
            if k != i:
                denominator += math.exp(cos(views[i], views[k]) / temperature)
        total += -math.log(positive / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("block", [None, 5, "auto"])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_matches_definition(temperature, block):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 5, generator=g)
    z2 = z1 + 0.5 * torch.randn(6, 5, generator=g)  # correlated positives, as after training
    loss = nt_xent_loss(z1, z2, temperature=temperature, block=block)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(nt_xent_by_hand(z1, z2, temperature), rel=1e-5)


@pytest.mark.parametrize("block", [None, 4])
def test_gradient_matches_definition(block):
    """Gradients of the vectorised loss equal finite differences of the looped definition."""
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    z2 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    a, b = z1.clone().float().requires_grad_(), z2.clone().float().requires_grad_()
    nt_xent_loss(a, b, temperature=0.5, block=block).backward()
    h = 1e-5
    for tensor, grad in ((z1, a.grad), (z2, b.grad)):
        for i in range(tensor.shape[0]):
            for j in range(tensor.shape[1]):
                orig = tensor[i, j].item()
                tensor[i, j] = orig + h
                up = nt_xent_by_hand(z1, z2, 0.5)
                tensor[i, j] = orig - h
                down = nt_xent_by_hand(z1, z2, 0.5)
                tensor[i, j] = orig
                assert grad[i, j].item() == pytest.approx((up - down) / (2 * h), abs=1e-4)


@pytest.mark.parametrize("block", [None, 3])
def test_perfect_alignment_and_scale_invariance(block):
    # Orthogonal images, identical views: each anchor's positive has s=1 and its 2N-2 negatives s=0,
    # so loss = -log(e^{1/t} / (e^{1/t} + (2N-2) e^0)), and every positive beats its negatives.
    z = torch.eye(4)
    t = 0.2
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 6))
    loss, stats = nt_xent_loss(z, z, t, block=block, return_stats=True)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["energy_pos"].item() == pytest.approx(-1.0) and stats["energy_neg"].item() == pytest.approx(0.0)
    assert stats["energy_gap"].item() == pytest.approx(1.0) and stats["pretext_top1"].item() == 1.0
    # cosine similarity ignores the norm of the projections
    assert nt_xent_loss(3 * z, 0.1 * z, t, block=block).item() == pytest.approx(expected, rel=1e-6)
    # without torch.distributed, gather=False gives the same value
    assert nt_xent_loss(z, z, t, gather=False, block=block).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_temperature_must_be_positive(temperature):
    z = torch.randn(4, 3)
    for block in (None, 2):
        with pytest.raises(ValueError, match=f"temperature must be > 0, got {temperature}"):
            nt_xent_loss(z, z, temperature=temperature, block=block)


@pytest.mark.parametrize("shapes", [((4, 3), (5, 3)), ((4, 3), (4, 2)), ((4,), (4,)), ((2, 4, 3), (2, 4, 3))])
def test_shape_errors(shapes):
    a, b = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    with pytest.raises(ValueError, match="shape"):
        nt_xent_loss(a, b)


def test_bf16_autocast_inputs():
    """Projections from a bf16 autocast matmul: the loss is computed in fp32 and stays close to fp32."""
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(32, 64, generator=g)
    x2 = x1 + 2.0 * torch.randn(32, 64, generator=g)  # hard enough that the loss is far from 0
    w = torch.randn(64, 128, generator=g) / 8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2 = x1 @ w, x2 @ w
        assert z1.dtype == torch.bfloat16  # the inputs really are bf16
        loss = nt_xent_loss(z1, z2, temperature=0.1)
        tiled = nt_xent_loss(z1, z2, temperature=0.1, block=5)
    assert loss.dtype == tiled.dtype == torch.float32
    assert torch.isfinite(loss)
    assert tiled.item() == pytest.approx(loss.item(), rel=1e-6)
    # The loss's own arithmetic adds no bf16 error: same value as fp32 math on the same (rounded) inputs.
    assert loss.item() == pytest.approx(nt_xent_by_hand(z1.float(), z2.float(), 0.1), rel=1e-5)
    # Only the rounding of the matmul remains relative to an all-fp32 pipeline.
    reference = nt_xent_by_hand(x1 @ w, x2 @ w, 0.1)
    assert reference > 0.5
    assert loss.item() == pytest.approx(reference, rel=5e-3)
