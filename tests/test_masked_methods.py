"""MAE, SimMIM and the denoising autoencoder: what the encoder sees, learning on a fixed batch, end to end on digits."""

import os

import pytest
import torch
from PIL import Image

from sslpipe.masking import patchify, unpatchify
from sslpipe.methods import DenoisingAutoencoder, MaskedAutoencoder, SimMIM
from sslpipe.optim import param_groups
from tests.helpers import TINY, read_metrics, run_cli

# 16-px images, 4-px patches (4x4 grid), one narrow block: milliseconds per step.
VIT = dict(
    backbone="vit_tiny_patch16_224",
    backbone_kwargs={"patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 3},
    image_size=16,
)
MAE_KW = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)


def _images(n=6, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_mae_encoder_sees_only_visible_patches_plus_cls():
    model = MaskedAutoencoder(mask_ratio=0.75, **MAE_KW, **VIT)
    lengths = []
    model.backbone.blocks.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    model.ssl_step([_images()], None)
    assert lengths == [1 + 4]  # 16 patches, 75% hidden -> 4 visible + class token
    model(_images())
    assert lengths[-1] == 1 + 16  # evaluation: the full image


@pytest.mark.parametrize("cls, kwargs", [(MaskedAutoencoder, MAE_KW), (SimMIM, {"mask_block_size": 1})])
def test_hidden_pixels_never_reach_the_prediction(cls, kwargs):
    torch.manual_seed(0)
    model = cls(**kwargs, **VIT).eval()
    images = _images()
    pred, _, mask = model.predict(images, _gen())[:3]
    patches = patchify(images, 4)
    noise = torch.randn(patches.shape, generator=_gen(5)) * 10
    hidden_changed = unpatchify(torch.where(mask.bool().unsqueeze(-1), noise, patches), 4)
    pred_hidden, _, mask2 = model.predict(hidden_changed, _gen())[:3]
    assert torch.equal(mask, mask2)
    assert torch.allclose(pred, pred_hidden, atol=1e-5)
    # the same change on the visible patches does change the prediction (the check above can fail)
    visible_changed = unpatchify(torch.where(mask.bool().unsqueeze(-1), patches, noise), 4)
    pred_visible = model.predict(visible_changed, _gen()).patches
    assert not torch.allclose(pred, pred_visible, atol=1e-3)


def test_fixed_sincos_positions_are_not_optimised():
    model = MaskedAutoencoder(**MAE_KW, **VIT)
    pos = model.backbone.pos_embed
    assert not pos.requires_grad and pos.shape == (1, 17, 48)
    # patch (row 1, col 2) of the 4x4 grid: first quarter of channels is sin(row * 1/10000^(k/12))
    assert torch.allclose(
        pos[0, 1 + 1 * 4 + 2, :12], torch.sin(torch.ones(12) / 10000 ** (torch.arange(12) / 12)), atol=1e-6
    )
    optimised = {id(p) for g in param_groups(model, 0.05) for p in g["params"]}
    assert id(pos) not in optimised and id(model.decoder.pos_embed) not in optimised


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_forward_matches_timm_forward_features(pool):
    model = MaskedAutoencoder(pool=pool, **MAE_KW, **VIT).eval()
    images = _images()
    tokens = model.backbone.forward_features(images)  # timm's own path with the (replaced) position table
    expected = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)
    assert torch.allclose(model(images), expected, atol=1e-5)


def test_mae_reconstruction_keeps_visible_patches_and_blanks_hidden_ones():
    model = MaskedAutoencoder(**MAE_KW, **VIT)
    images = _images()
    corrupted, recon = model.reconstruct(images, _gen(3))
    mask = model.predict(images, _gen(3))[2].bool()
    target, c, r = patchify(images, 4), patchify(corrupted, 4), patchify(recon, 4)
    assert torch.equal(r[~mask], target[~mask]) and torch.equal(c[~mask], target[~mask])
    assert torch.all(c[mask] == 0) and not torch.allclose(r[mask], target[mask])


def test_dae_corrupts_with_gaussian_noise_and_scores_every_patch():
    model = DenoisingAutoencoder(noise_std=0.3, **VIT)
    images = _images()
    pred, corrupted, mask = model.predict(images, _gen(4))[:3]
    expected_noisy = images + 0.3 * torch.randn(images.shape, generator=_gen(4))
    assert mask is None and torch.allclose(corrupted, patchify(expected_noisy, 4))
    assert model.loss(pred, patchify(images, 4), mask).item() == pytest.approx(
        ((pred - patchify(images, 4)) ** 2).mean().item(), rel=1e-5
    )


@pytest.mark.parametrize(
    "cls, kwargs", [(MaskedAutoencoder, MAE_KW), (SimMIM, {"mask_block_size": 1}), (DenoisingAutoencoder, {})]
)
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(cls, kwargs):
    torch.manual_seed(0)
    model = cls(**kwargs, **VIT)
    # smooth images (a low-frequency pattern) so hidden patches are predictable from visible ones
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 16), torch.linspace(0, 3, 16), indexing="ij")
    phase = torch.rand(8, 3, 1, 1) * 6
    images = torch.sin(xx + yy + phase)
    target = patchify(images, 4)

    def eval_loss():
        with torch.no_grad():
            pred, _, mask = model.predict(images, _gen(9))[:3]
            return model.loss(pred, target, mask).item()

    before = eval_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(20):
        opt.zero_grad()
        model.ssl_step([images], None).loss.backward()
        opt.step()
    assert eval_loss() < 0.85 * before


def test_simmim_probe_features_average_only_the_visible_patch_tokens():
    model = SimMIM(pool="mean", mask_block_size=1, **VIT)
    images = torch.randn(3, 3, 16, 16)
    torch.manual_seed(5)
    features = model.ssl_step([images], None).features
    torch.manual_seed(5)  # the same mask again: predict() is the step's first random draw
    out = model.predict(images)
    mask, tokens = out.mask, out.tokens
    for b in range(3):
        visible = tokens[b, 1:][mask[b] == 0]
        assert 0 < len(visible) < 16
        torch.testing.assert_close(features[b], visible.mean(dim=0))


TINY_VIT = [
    "--model.init_args.backbone_kwargs",
    "{patch_size: 4, depth: 1, embed_dim: 48, num_heads: 3}",
    "--data.image_size",
    "16",
    "--model.init_args.reconstruction_images",
    "4",
]


@pytest.mark.parametrize(
    "variant, extra",
    [
        (
            "mae",
            [
                "--model.init_args.decoder_dim",
                "32",
                "--model.init_args.decoder_heads",
                "2",
                "--model.init_args.decoder_depth",
                "1",
            ],
        ),
        ("simmim", []),
        ("dae", []),
    ],
)
def test_pretrain_digits_writes_reconstructions_then_knn(runs_dir, variant, extra):
    run_dir, _ = run_cli(
        [
            "pretrain",
            "--config",
            f"configs/{variant}/digits.yaml",
            "--trainer.default_root_dir",
            runs_dir,
            *TINY,
            *TINY_VIT,
            *extra,
        ]
    )
    metrics = read_metrics(run_dir)
    assert metrics["method"] == variant and metrics["global_step"] == 3
    png = os.path.join(run_dir, "reconstructions", "epoch_000.png")
    with Image.open(png) as grid:  # 3 rows (input, corrupted, reconstruction) x 4 images of 16 px, 2-px padding
        assert grid.size == (4 * 18 + 2, 3 * 18 + 2)
    eval_dir, _ = run_cli(
        ["knn", "--checkpoint", f"{run_dir}/checkpoints/last.ckpt", "--trainer.default_root_dir", runs_dir]
    )
    result = read_metrics(eval_dir)
    assert result["method"] == variant and result["feature_dim"] == 48 and 0 <= result["knn_top1"] <= 100
