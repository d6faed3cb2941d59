"""``data.augment_on device``: the batched photometric half against torchvision's per-sample path.

Exact checks: each batched op against torchvision's functional op applied sample by sample (float images, where
torchvision does not round). Statistical checks: the two paths on the same uint8 inputs over many draws (per-sample
path: fresh torchvision draws; batched path: one large batch of copies) give the same per-channel means and stds,
the same share of grayscale outputs (= ``grayscale_p``), the same blur strength, and per-sample statistics with the
same distribution (two-sample Kolmogorov-Smirnov distance below its 0.1% critical value). Then seeding, ranks,
checkpointed generator state, uint8 out of the workers, no host syncs, and ``sslpipe pretrain`` end to end.
"""

from __future__ import annotations

import math
import os
import types

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from sslpipe.augment import JigsawViews, MAEViews, SimCLRViews
from sslpipe.augment.batched import BatchedPhotometric, adjust_hue, color_jitter, gaussian_blur
from sslpipe.augment.simclr import SimCLRAugment, photometric_ops
from sslpipe.data import SSLDataModule
from tests.helpers import TINY, read_metrics, run_cli

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)
SIZE = 32
# Geometry off (whole square image, no flip): both paths see the same pixels, only photometric ops differ.
NO_GEOMETRY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0)
DRAWS = 1200  # per path and setting


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 ``(3, SIZE, SIZE)`` images: smooth colour fields plus fine texture (so blur and hue matter)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = []
    for _ in range(n):
        channels = []
        for _c in range(3):
            fx, fy, phase = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
            smooth = 0.5 + 0.3 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
            channels.append(smooth + 0.15 * rng.standard_normal((SIZE, SIZE)))
        out.append(np.clip(np.stack(channels) * 255, 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(out))


def _per_sample(aug: SimCLRAugment, images: torch.Tensor, draws: int, seed: int = 0) -> torch.Tensor:
    """torchvision's per-sample pipeline (photometric ops, then to float and normalise), ``draws`` fresh draws."""
    transform = v2.Compose(
        [*photometric_ops(aug, SIZE), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(MEAN), list(STD))]
    )
    torch.manual_seed(seed)
    return torch.stack([transform(images[i % len(images)]) for i in range(draws)])


def _batched(aug: SimCLRAugment, images: torch.Tensor, draws: int, seed: int = 0) -> torch.Tensor:
    """The batched path on one batch holding the same sequence of inputs."""
    batch = images[torch.arange(draws) % len(images)]
    return BatchedPhotometric(aug, SIZE, MEAN, STD)(batch, torch.Generator().manual_seed(seed))


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance: the largest gap between the two empirical CDFs."""
    points = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, points, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def _ks_critical(n: int, m: int, alpha: float = 1e-3) -> float:
    """The KS distance two samples of one distribution exceed with probability ``alpha``."""
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


def _high_frequency(x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared difference of horizontally and vertically neighbouring pixels."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean((1, 2, 3))
    dy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean((1, 2, 3))
    return dx + dy


def _is_gray(x: torch.Tensor) -> torch.Tensor:
    """Per sample: all three channels equal within 1.5/255 (in [0, 1] units)."""
    u = _unnormalise(x)
    return ((u[:, 0] - u[:, 1]).abs().amax((1, 2)) < 1.5 / 255) & ((u[:, 1] - u[:, 2]).abs().amax((1, 2)) < 1.5 / 255)


# ------------------------------------------------------------------ each op against torchvision, exactly
def test_color_jitter_matches_torchvision_per_sample_factors_and_order():
    """Every sample: its own factors applied in its own order by torchvision's functional ops (float path)."""
    g = torch.Generator().manual_seed(0)
    x = _images(6).float() / 255
    x = torch.cat([x, x])  # 12 samples: each image under two different draws
    n = len(x)
    blend = 0.3 + 1.4 * torch.rand(n, 3, generator=g)
    hue = 0.5 * (2 * torch.rand(n, generator=g) - 1)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(n)])
    out = color_jitter(x, blend, hue, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(n):
        y = x[i]
        for op in order[i].tolist():
            y = ops[op](y, float(hue[i]) if op == 3 else float(blend[i, op]))
        torch.testing.assert_close(out[i], y, atol=2e-5, rtol=0)


def test_hue_matches_torchvision_on_grey_and_saturated_pixels():
    x = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.2, 0.2], [0.0, 0.5, 1.0], [1.0, 1.0, 0.0]]).T.reshape(1, 3, 2, 2)
    for shift in (-0.5, -0.3, 0.0, 0.17, 0.5):
        torch.testing.assert_close(
            adjust_hue(x, torch.tensor([shift]))[0], TF.adjust_hue(x[0], shift), atol=1e-6, rtol=0
        )


def test_blur_matches_torchvision_per_sample_sigma():
    x = _images(3).float() / 255
    sigma = torch.tensor([0.3, 1.0, 2.0])
    out = gaussian_blur(x, sigma, torch.tensor([True, True, False]), 5)
    for i in range(2):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2], x[2])  # not applied: untouched


# ------------------------------------------------------------------ the two paths' statistics over many draws
RECIPES = {
    "simclr_default": dict(NO_GEOMETRY),
    "solarize_strong_jitter": dict(NO_GEOMETRY, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.4, solarize_p=0.5),
    "grayscale_only": dict(NO_GEOMETRY, jitter_p=0.0, blur_p=0.0, grayscale_p=0.35),
    "blur_only": dict(NO_GEOMETRY, jitter_p=0.0, grayscale_p=0.0, blur_p=0.6, blur_sigma=(0.1, 2.0)),
}


@pytest.fixture(scope="module")
def drawn() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    images = _images()
    out = {}
    for name, kwargs in RECIPES.items():
        aug = SimCLRAugment(**kwargs)
        out[name] = (_per_sample(aug, images, DRAWS), _batched(aug, images, DRAWS))
    return out


@pytest.mark.parametrize("name", list(RECIPES))
def test_channel_means_and_stds_agree(drawn, name):
    """Per-channel mean and std over all draws agree within 0.03 (normalised units; the std of a channel mean over
    1200 draws is ~0.01, and the per-sample path's uint8 rounding after each op shifts it by up to ~0.01)."""
    cpu, dev = drawn[name]
    assert dev.dtype == torch.float32 and dev.shape == cpu.shape
    for c in range(3):
        assert abs(float(cpu[:, c].mean() - dev[:, c].mean())) < 0.03, (name, c)
        assert abs(float(cpu[:, c].std() - dev[:, c].std())) < 0.03, (name, c)


@pytest.mark.parametrize("name", ["simclr_default", "solarize_strong_jitter"])
def test_per_sample_statistics_have_the_same_distribution(drawn, name):
    """Per-sample channel means, contrast and high-frequency energy: KS distance below its 0.1% critical value.
    Catches anything a batch-wide draw changes (one factor or one order for the whole batch). Only for recipes
    with colour jitter: without it these statistics take a few discrete values, which the per-sample path's uint8
    rounding moves slightly, and KS is not meant for atoms."""
    cpu, dev = drawn[name]
    critical = _ks_critical(len(cpu), len(dev))
    cpu_u, dev_u = _unnormalise(cpu), _unnormalise(dev)
    stats = {
        "mean_r": lambda u: u[:, 0].mean((1, 2)),
        "mean_b": lambda u: u[:, 2].mean((1, 2)),
        "std": lambda u: u.std((1, 2, 3)),
        "high_frequency": _high_frequency,
    }
    for stat, fn in stats.items():
        assert _ks(fn(cpu_u), fn(dev_u)) < critical, (name, stat)


@pytest.mark.parametrize("name", ["simclr_default", "grayscale_only"])
def test_share_of_grayscale_outputs_is_p_gray(drawn, name):
    """Share of outputs with R = G = B: within 4 binomial standard deviations of ``grayscale_p`` on both paths."""
    p = SimCLRAugment(**RECIPES[name]).grayscale_p
    bound = 4 * math.sqrt(p * (1 - p) / DRAWS)
    for path in drawn[name]:
        assert abs(float(_is_gray(path).float().mean()) - p) < bound, name


def test_blur_strength_agrees(drawn):
    """Mean high-frequency energy and the share of blurred samples (energy below 60% of the input's) agree."""
    cpu, dev = (_high_frequency(_unnormalise(x)) for x in drawn["blur_only"])
    source = _high_frequency(_images().float() / 255)[torch.arange(DRAWS) % 4]
    assert abs(float(cpu.mean() / dev.mean()) - 1) < 0.05
    cpu_blurred, dev_blurred = (float((e < 0.6 * source).float().mean()) for e in (cpu, dev))
    assert abs(cpu_blurred - dev_blurred) < 4 * math.sqrt(0.25 / DRAWS)
    assert 0.3 < dev_blurred < 0.6  # blur_p 0.6, of which sigma < ~0.5 barely blurs


def test_order_is_drawn_per_sample():
    """Saturation and hue do not commute: on a red/blue image, hue first then saturation 0 gives the luma of the
    rotated colour, saturation first gives the luma of the original. Per-sample channel means must have the
    distribution of torchvision's 50/50 mixture of the two (one random order per sample); one order for the whole
    batch (either one) is 0.11-0.15 away in KS distance, measured, above the 0.062 critical value."""
    jitter = dict(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=1.0, hue=0.5)
    aug = SimCLRAugment(**NO_GEOMETRY, **jitter, grayscale_p=0.0, blur_p=0.0)
    image = torch.full((1, 3, SIZE, SIZE), 20, dtype=torch.uint8)
    image[0, 0, :, : SIZE // 2] = 250
    image[0, 2, :, SIZE // 2 :] = 250
    cpu, dev = (_unnormalise(x) for x in (_per_sample(aug, image, 2000), _batched(aug, image, 2000)))
    for c in range(3):
        assert _ks(cpu[:, c].mean((1, 2)), dev[:, c].mean((1, 2))) < _ks_critical(2000, 2000), c


# ------------------------------------------------------------------ recipes, seeds, ranks, checkpoints
def _loader_views(recipe, n: int = 6, seed: int = 0) -> list[torch.Tensor]:
    from PIL import Image
    from torch.utils.data import default_collate

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]
    transform = recipe.build_geometric(SIZE)
    torch.manual_seed(seed)
    return default_collate([transform(im) for im in images])


@pytest.mark.parametrize(
    "recipe",
    [
        SimCLRViews(),
        SimCLRViews(per_view=[{"blur_p": 1.0}, {"blur_p": 0.1, "solarize_p": 0.2}]),
        MAEViews(),
        JigsawViews(),
    ],
    ids=["simclr", "byol_asymmetric", "mae", "pirl"],
)
def test_every_recipe_same_seed_same_views_other_seed_other_views(recipe):
    views = _loader_views(recipe)
    assert all(v.dtype == torch.uint8 for v in views if v.is_floating_point() or v.ndim > 1)
    batched = recipe.build_batched(SIZE, MEAN, STD)
    a = batched(views, torch.Generator().manual_seed(1))
    b = batched(views, torch.Generator().manual_seed(1))
    c = batched(views, torch.Generator().manual_seed(2))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    images = [x for x in a if x.is_floating_point()]
    assert all(x.dtype == torch.float32 for x in images)
    if not isinstance(recipe, MAEViews):  # MAE: normalisation only, nothing random
        assert any(not torch.equal(x, y) for x, y in zip(a, c) if x.is_floating_point())
    else:  # exactly (x / 255 - mean) / std
        expected = (views[0].float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        torch.testing.assert_close(a[0], expected)


def test_jigsaw_tiles_are_augmented_independently():
    """A tile batch of 9 copies of one tile: the tiles of an image get different colour draws."""
    recipe = JigsawViews(tile={"jitter_p": 1.0})
    views = _loader_views(recipe, n=2)
    views[1] = views[1][:, :1].expand(-1, 9, -1, -1, -1).contiguous()
    _, tiles, index = recipe.build_batched(SIZE, MEAN, STD)(views, torch.Generator().manual_seed(0))
    assert tiles.shape == views[1].shape and torch.equal(index, views[2])
    flat = tiles[0].flatten(1)
    assert len({round(float(m), 5) for m in flat.mean(1)}) == 9


def _fake_trainer(rank: int, world: int = 2, step: int = 0, training: bool = True):
    precision = types.SimpleNamespace(convert_input=lambda x: x)
    return types.SimpleNamespace(
        global_rank=rank, world_size=world, global_step=step, training=training, precision_plugin=precision
    )


def _datamodule(augment_on: str = "device", **kwargs) -> SSLDataModule:
    dm = SSLDataModule(image_size=16, batch_size=8, num_workers=0, augment_on=augment_on, **kwargs)
    dm.setup("fit")
    return dm


def test_ranks_draw_different_streams_and_seed_repeats(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    views, _, _ = next(iter(_datamodule().train_dataloader()))
    out = []
    for rank in (0, 1, 0):
        dm = _datamodule()
        dm.trainer = _fake_trainer(rank)
        out.append(dm.device_views(views))
    assert torch.equal(out[0][0], out[2][0])  # same seed and rank: same views
    assert not torch.equal(out[0][0], out[1][0])  # rank 1: its own stream


def test_generator_state_round_trips_through_the_checkpoint(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    dm = _datamodule()
    dm.trainer = _fake_trainer(0, world=1)
    views, _, _ = next(iter(dm.train_dataloader()))
    dm.device_views(views)
    state = dm.state_dict()
    expected = dm.device_views(views)
    resumed = _datamodule()
    resumed.trainer = _fake_trainer(0, world=1, step=1)
    resumed.load_state_dict(state)
    for x, y in zip(resumed.device_views(views), expected):
        assert torch.equal(x, y)  # continues the saved stream, not a fresh one


def test_hook_augments_training_batches_only_and_cpu_mode_is_untouched():
    dm = _datamodule()
    views, labels, indices = next(iter(dm.train_dataloader()))
    assert all(v.dtype == torch.uint8 for v in views)
    dm.trainer = _fake_trainer(0, training=False)
    val_batch = next(iter(dm.val_dataloader()))
    assert dm.on_after_batch_transfer(val_batch, 0) is val_batch  # the probe's batches stay as the eval transform made
    assert dm.on_after_batch_transfer((views, labels, indices), 0)[0] is views  # not training: nothing applied
    dm.trainer = _fake_trainer(0)
    out, out_labels, _ = dm.on_after_batch_transfer((views, labels, indices), 0)
    assert all(v.dtype == torch.float32 for v in out) and out_labels is labels
    assert abs(float(out[0].mean())) < 3  # normalised once, not twice (twice: ~ -mean/std^2 ~ -5 for digits)
    cpu = _datamodule("cpu")
    cpu.trainer = _fake_trainer(0)
    batch = next(iter(cpu.train_dataloader()))
    assert batch[0][0].dtype == torch.float32 and cpu.on_after_batch_transfer(batch, 0) is batch


def test_uint8_leaves_the_worker_processes():
    for views in (None, JigsawViews(grid_size=15, tile_size=8), MAEViews()):
        dm = SSLDataModule(image_size=16, batch_size=8, num_workers=1, persistent_workers=False, augment_on="device")
        if views is not None:
            dm.views = views
        dm.setup("fit")
        batch_views, _, _ = next(iter(dm.train_dataloader()))
        assert all(v.dtype == torch.uint8 for v in batch_views if v.ndim > 1), type(dm.views).__name__


def test_auto_resolves_by_accelerator(monkeypatch):
    from pytorch_lightning.accelerators import CPUAccelerator

    import sslpipe.data.datamodule as datamodule

    dm = SSLDataModule(num_workers=0)
    dm.trainer = types.SimpleNamespace(accelerator=CPUAccelerator())
    monkeypatch.setattr(datamodule, "CPU_AUGMENT_DEFAULT", "cpu")
    assert dm.resolved_augment_on() == "cpu"
    monkeypatch.setattr(datamodule, "CPU_AUGMENT_DEFAULT", "device")
    assert dm.resolved_augment_on() == "device"
    dm.trainer = types.SimpleNamespace(accelerator=object())  # any accelerator but the CPU
    assert dm.resolved_augment_on() == "device"
    assert SSLDataModule(num_workers=0, augment_on="cpu").resolved_augment_on() == "cpu"
    with pytest.raises(ValueError, match="augment_on"):
        SSLDataModule(augment_on="gpu")


SYNCS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def test_batched_path_never_waits_for_the_device(monkeypatch):
    recipes = [SimCLRViews(solarize_p=0.2), JigsawViews(), MAEViews()]
    calls = [(r.build_batched(SIZE, MEAN, STD), _loader_views(r)) for r in recipes]
    for batched, views in calls:
        batched(views, torch.Generator().manual_seed(0))  # constants are made on the first call only
    for name in SYNCS:

        def forbidden(*args, _name=name, **kwargs):
            raise AssertionError(f"host sync: Tensor.{_name} in the batched augmentation")

        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for batched, views in calls:
        batched(views, torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("config", ["configs/simclr/digits.yaml", "configs/pirl/digits.yaml"])
def test_pretrain_with_device_augmentation(config, runs_dir):
    run_dir, _ = run_cli(
        [
            "pretrain",
            "--config",
            config,
            "--trainer.default_root_dir",
            runs_dir,
            *TINY,
            "--trainer.limit_train_batches",
            "2",
            "--data.image_size",
            "16",
            "--data.augment_on",
            "device",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.check_val_every_n_epoch",
            "1",
        ]
    )
    metrics = read_metrics(run_dir)
    assert metrics["global_step"] == 2 and math.isfinite(metrics["train_loss"])
    assert 0 <= metrics["online_linear_top1"] <= 100  # the probe's validation batches went through the eval transform
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=False)
    saved = ckpt["SSLDataModule"]["augment_generator"]
    assert saved["device_type"] == "cpu" and saved["world_size"] == 1


def test_bench_augment_runs_at_a_tiny_size():
    """scripts/bench_augment.py works end to end (its timings are only meaningful on an idle machine)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_augment.py")
    spec = importlib.util.spec_from_file_location("bench_augment", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(sizes=[16], device="cpu", iters=1, warmup=0, batch=4)
    assert len(rows) == 1 and rows[0]["image_size"] == 16 and rows[0]["batch"] == 4 and rows[0]["device"] == "cpu"
    assert rows[0]["batched_images_per_s"] > 0 and rows[0]["per_sample_images_per_s_per_core"] > 0
    table = bench.markdown(rows)
    assert table.count("\n") == 2 and "| 16 | 4 | cpu |" in table


def test_recipe_without_device_half():
    """A custom recipe with only ``build``: auto falls back to per-sample views, explicit device names the fix."""
    from sslpipe.augment import ViewRecipe, eval_transform
    from sslpipe.errors import ConfigError

    class PlainRecipe(ViewRecipe):
        def build(self, image_size, mean, std):
            return eval_transform(image_size, mean, std)

    dm = SSLDataModule(image_size=16, batch_size=8, num_workers=0, augment_on="auto", views=PlainRecipe())
    dm.setup("fit")
    views, _, _ = next(iter(dm.train_dataloader()))
    assert views.dtype == torch.float32 and dm.device_views(views) is views
    with pytest.raises(ConfigError, match="--data.augment_on cpu"):
        SSLDataModule(image_size=16, num_workers=0, augment_on="device", views=PlainRecipe()).setup("fit")


def test_jitter_order_draw_is_uniform_and_grouped_hue_equals_the_masked_path():
    """``draw_jitter_order``: every row a permutation, each of the 24 orders equally likely for one sample (chi-square
    over many batches), the groups are exactly the rows whose hue op is in that slot; and ``color_jitter`` with the
    groups (hue converted once per sample) equals the path that converts the whole batch at every slot."""
    from sslpipe.augment.batched import draw_jitter_order

    g = torch.Generator().manual_seed(0)
    n, batches = 10, 2400
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(batches):
        order, groups = draw_jitter_order(n, torch.device("cpu"), g)
        assert sorted(order[0].tolist()) == [0, 1, 2, 3]
        assert torch.equal(order.sort(1).values, torch.arange(4).expand(n, 4))
        for slot, rows in enumerate(groups):
            expected = (order[:, slot] == 3).nonzero().flatten()
            assert torch.equal(rows[rows < n].sort().values, expected)  # index n: the padding row
        key = tuple(order[3].tolist())  # one fixed sample position: its order must be uniform over 24
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 24
    expected_count = batches / 24
    chi2 = sum((c - expected_count) ** 2 / expected_count for c in counts.values())
    assert chi2 < 49.7  # chi-square, 23 degrees of freedom, p = 0.001

    x = torch.rand(n, 3, 16, 16, generator=g)
    blend = 0.5 + torch.rand(n, 3, generator=g)
    hue = 0.4 * torch.rand(n, generator=g) - 0.2
    order, groups = draw_jitter_order(n, torch.device("cpu"), g)
    torch.testing.assert_close(color_jitter(x, blend, hue, order, groups), color_jitter(x, blend, hue, order))
