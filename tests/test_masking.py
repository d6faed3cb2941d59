"""Patch/mask tensor tools and reconstruction losses, checked against explicit loops and formulas."""

import math

import pytest
import torch

from sslpipe.losses.reconstruction import masked_l1_loss, masked_mse_loss
from sslpipe.masking import (
    block_masking,
    gather_tokens,
    patchify,
    random_masking,
    shuffle_tokens,
    sincos_pos_embed_2d,
    unpatchify,
    unshuffle_tokens,
)


# ----------------------------------------------------------------------------- patchify
def test_patchify_matches_explicit_crops():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 12)
    p = 4
    patches = patchify(images, p)
    assert patches.shape == (2, 6, p * p * 3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                crop = images[b, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # (C, p, p)
                expected = [crop[c, y, x] for y in range(p) for x in range(p) for c in range(3)]
                assert torch.equal(patches[b, i * 3 + j], torch.stack(expected))


def test_unpatchify_round_trip_square_and_rectangular():
    torch.manual_seed(0)
    square = torch.randn(3, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(square, 4), 4), square)
    rect = torch.randn(2, 3, 8, 12)
    assert torch.equal(unpatchify(patchify(rect, 4), 4, grid=(2, 3)), rect)
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 3, 10, 10), 4)


# ----------------------------------------------------------------------------- masking
@pytest.mark.parametrize("num_patches, ratio, hidden", [(64, 0.75, 48), (16, 0.6, 10), (196, 0.75, 147)])
def test_random_masking_hides_exact_share_per_sample(num_patches, ratio, hidden):
    m = random_masking(7, num_patches, ratio, generator=torch.Generator().manual_seed(0))
    assert m.mask.shape == (7, num_patches)
    assert set(m.mask.unique().tolist()) <= {0.0, 1.0}
    assert m.mask.sum(dim=1).tolist() == [hidden] * 7
    for b in range(7):
        visible = {i for i in range(num_patches) if m.mask[b, i] == 0}
        assert set(m.ids_keep[b].tolist()) == visible  # ids_keep lists exactly the visible patches
        assert len(m.ids_keep[b].unique()) == num_patches - hidden


def test_masks_differ_across_samples_and_calls():
    m = random_masking(8, 64, 0.75, generator=torch.Generator().manual_seed(0))
    rows = {tuple(r.tolist()) for r in m.mask}
    assert len(rows) == 8
    again = random_masking(8, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(m.mask, again.mask)


def test_ids_restore_inverts_the_shuffle():
    m = random_masking(4, 16, 0.5, generator=torch.Generator().manual_seed(0))
    shuffle = m.ids_shuffle
    for b in range(4):
        for pos in range(16):
            assert shuffle[b, m.ids_restore[b, pos]] == pos
        assert shuffle[b, :8].tolist() == m.ids_keep[b].tolist()


def test_gather_shuffle_unshuffle():
    torch.manual_seed(0)
    x = torch.randn(3, 16, 5)
    m = random_masking(3, 16, 0.75, generator=torch.Generator().manual_seed(2))
    kept = gather_tokens(x, m.ids_keep)
    for b in range(3):
        for i, idx in enumerate(m.ids_keep[b].tolist()):
            assert torch.equal(kept[b, i], x[b, idx])
    shuffled = shuffle_tokens(x, m)
    assert torch.equal(shuffled[:, :4], kept)  # visible tokens come first
    assert torch.equal(unshuffle_tokens(shuffled, m), x)


def test_block_masking_hides_whole_blocks():
    mask = block_masking(5, (8, 8), 2, 0.75, generator=torch.Generator().manual_seed(0))
    assert mask.sum(dim=1).tolist() == [48] * 5  # 12 of 16 blocks, 4 patches each
    grid = mask.reshape(5, 8, 8)
    for b in range(5):
        for bi in range(4):
            for bj in range(4):
                block = grid[b, 2 * bi : 2 * bi + 2, 2 * bj : 2 * bj + 2]
                assert block.min() == block.max()
    with pytest.raises(ValueError, match="divide"):
        block_masking(1, (8, 8), 3, 0.5)


def test_mask_ratio_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(1, 16, 1.0)


# ----------------------------------------------------------------------------- sin-cos
def test_sincos_2d_matches_formula():
    dim, rows, cols = 8, 3, 4
    emb = sincos_pos_embed_2d(dim, (rows, cols), num_prefix_tokens=1)
    assert emb.shape == (1, 1 + rows * cols, dim)
    assert torch.equal(emb[0, 0], torch.zeros(dim))  # the class token has no position
    quarter = dim // 4
    for r in range(rows):
        for c in range(cols):
            expected = []
            for pos in (r, c):
                freqs = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
                expected += [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]
            assert torch.allclose(emb[0, 1 + r * cols + c], torch.tensor(expected), atol=1e-6)


# ----------------------------------------------------------------------------- losses
def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(3, 6, 12, generator=g)
    target = torch.randn(3, 6, 12, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    return pred, target, mask


def test_masked_mse_matches_loop_and_ignores_visible():
    pred, target, mask = _setup()
    total, count = 0.0, 0
    for b in range(3):
        for i in range(6):
            if mask[b, i] == 1:
                total += sum((float(pred[b, i, d]) - float(target[b, i, d])) ** 2 for d in range(12)) / 12
                count += 1
    assert masked_mse_loss(pred, target, mask).item() == pytest.approx(total / count, rel=1e-5)
    # perfect on hidden patches -> zero, however wrong the visible ones are
    perfect = torch.where(mask.bool().unsqueeze(-1), target, pred * 100)
    assert masked_mse_loss(perfect, target, mask).item() == 0.0
    changed = pred.clone()
    changed[0, 1] += 50.0  # patch (0, 1) is visible
    assert masked_mse_loss(changed, target, mask).item() == masked_mse_loss(pred, target, mask).item()
    assert masked_mse_loss(pred, target, None).item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-6)


def test_norm_pix_target_is_per_patch_standardised():
    pred, target, mask = _setup(1)
    target = target * 3 + 5
    expected_target = torch.empty_like(target)
    for b in range(3):
        for i in range(6):
            vals = [float(v) for v in target[b, i]]
            mean = sum(vals) / len(vals)
            var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)  # unbiased, as MAE
            expected_target[b, i] = torch.tensor([(v - mean) / math.sqrt(var + 1e-6) for v in vals])
    expected = masked_mse_loss(pred, expected_target, mask)
    assert masked_mse_loss(pred, target, mask, norm_pix=True).item() == pytest.approx(expected.item(), rel=1e-5)
    assert masked_mse_loss(expected_target, target, mask, norm_pix=True).item() == pytest.approx(0.0, abs=1e-8)


def test_masked_l1_matches_loop_and_runs_fp32_under_autocast():
    pred, target, mask = _setup(2)
    total = sum(
        sum(abs(float(pred[b, i, d]) - float(target[b, i, d])) for d in range(12)) / 12
        for b in range(3)
        for i in range(6)
        if mask[b, i] == 1
    )
    assert masked_l1_loss(pred, target, mask).item() == pytest.approx(total / mask.sum().item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_l1_loss(pred.bfloat16(), target.bfloat16(), mask)
    assert out.dtype == torch.float32
