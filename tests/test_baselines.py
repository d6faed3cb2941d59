"""The random-init baseline: a standard initialisation (no zeroed residual branches), never trained weights.

timm ResNets zero the last BatchNorm scale of every residual block (``zero_init_last``), a training aid that
turns the untrained network into a stem plus pooling; evaluated as "random init" it scores near chance and
flatters every method. The baseline must be checked against timm's own ``zero_init_last=False`` and against
torchvision's ResNet-18 (``zero_init_residual=False``), not against sslpipe's output.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from sslpipe.backbones import build_backbone, standard_init_
from sslpipe.checkpoints import build_method
from sslpipe.methods import SimCLR

SMALL = dict(backbone="resnet18", image_size=32, proj_hidden_dim=16, proj_output_dim=8, num_classes=10)


def _checkpoint(model: nn.Module) -> dict:
    """The dict :func:`sslpipe.checkpoints.load_checkpoint` returns for ``model`` (what Lightning saves)."""
    return {
        "sslpipe_method": f"{type(model).__module__}.{type(model).__qualname__}",
        "hyper_parameters": dict(model.hparams),
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _trained_checkpoint(seed: int = 1) -> dict:
    """A checkpoint whose weights no fresh network has: every parameter moved by a seeded offset."""
    torch.manual_seed(seed)
    model = SimCLR(**SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return _checkpoint(model)


def _last_bns(backbone: nn.Module) -> list[nn.BatchNorm2d]:
    """The last BatchNorm of each residual branch of a timm ResNet (bn2 of a BasicBlock, bn3 of a Bottleneck)."""
    blocks = [m for m in backbone.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    assert blocks, "no residual blocks found"
    return [b.bn3 if hasattr(b, "bn3") else b.bn2 for b in blocks]


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ the init itself
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_standard_init_is_timm_without_zero_init_last(name):
    """Same seed: build_backbone + standard_init_ == timm.create_model(zero_init_last=False), bit for bit;
    build_backbone alone (the training path) == timm's default, zeroed last BN scales included."""
    torch.manual_seed(0)
    trained_path, _ = build_backbone(name)
    torch.manual_seed(0)
    baseline = standard_init_(build_backbone(name)[0])
    torch.manual_seed(0)
    timm_default = timm.create_model(name, pretrained=False, num_classes=0)
    torch.manual_seed(0)
    timm_standard = timm.create_model(name, pretrained=False, num_classes=0, zero_init_last=False)
    assert _same_state(trained_path, timm_default)
    assert all(torch.all(bn.weight == 0) for bn in _last_bns(trained_path))  # the training path keeps zero-init
    assert _same_state(baseline, timm_standard)
    assert all(torch.all(bn.weight == 1) for bn in _last_bns(baseline))


def test_standard_init_leaves_vits_and_torchvision_resnets_alone_and_undoes_layer_scale():
    """Backbones with nothing zeroed are unchanged; torchvision's zero_init_residual and a ViT's LayerScale
    are set to what zero_init_residual=False / init_values=None would give."""
    for name, kwargs in [
        ("vit_tiny_patch16_224", dict(image_size=32, patch_size=4, depth=2)),
        ("torchvision/resnet18", {}),
    ]:
        torch.manual_seed(0)
        model, _ = build_backbone(name, **kwargs)
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        standard_init_(model)
        assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items()), name
    torch.manual_seed(0)
    zeroed, _ = build_backbone("torchvision/resnet18", zero_init_residual=True)
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(weights=None)
    plain.fc = nn.Identity()
    assert not _same_state(zeroed, plain)
    assert _same_state(standard_init_(zeroed), plain)
    vit, _ = build_backbone("vit_tiny_patch16_224", image_size=32, patch_size=4, depth=2, init_values=1e-5)
    gammas = [m.gamma for m in vit.modules() if type(m).__name__ == "LayerScale"]
    assert len(gammas) == 4 and all(torch.all(g == 1e-5) for g in gammas)
    standard_init_(vit)
    assert all(torch.all(g == 1) for g in gammas)


# ------------------------------------------------------------------ the random twin of a checkpoint
def test_random_twin_is_a_standard_init_not_the_trained_weights():
    """build_method(random_init=True): the seeded standard init (timm zero_init_last=False), no stored weight,
    residual branches live; the trained path loads exactly the stored weights."""
    checkpoint = _trained_checkpoint()
    torch.manual_seed(7)
    twin = build_method(checkpoint, random_init=True)
    torch.manual_seed(7)  # the backbone is the first thing SSLMethod builds from the seed
    reference = timm.create_model("resnet18", pretrained=False, num_classes=0, zero_init_last=False)
    assert _same_state(twin.backbone, reference)
    assert all(torch.all(bn.weight != 0) for bn in _last_bns(twin.backbone))
    stored = checkpoint["state_dict"]
    weights = [k for k in stored if k.startswith("backbone.") and k.endswith("weight")]
    assert all(not torch.equal(twin.state_dict()[k], stored[k]) for k in weights)
    trained = build_method(checkpoint)
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in stored.items())


def test_random_twin_residual_branches_are_not_identities():
    """Each block of the twin changes its input (out != relu(x + shortcut(x)) with a zeroed branch)."""
    torch.manual_seed(0)
    twin = build_method(_checkpoint(SimCLR(**SMALL)), random_init=True).backbone.eval()
    x = torch.randn(2, 64, 8, 8)
    block = twin.layer1[0]
    with torch.no_grad():
        identity = F.relu(x)  # layer1[0] has no downsample: a zeroed branch would give relu(x + 0)
        assert (block(x) - identity).abs().mean() > 0.1


# ------------------------------------------------------------------ digits kNN, independent of sslpipe's probes
def _digits_images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sslpipe's digits split through its eval transform (what `sslpipe knn` embeds)."""
    from sslpipe.data import SSLDataModule

    data = SSLDataModule(dataset="digits", image_size=32, batch_size=256, num_workers=0)
    out = []
    for split in ("train", "val"):
        xs, ys = zip(*[(x, y) for x, y in data.eval_dataloader(split)])
        out += [torch.cat(xs), torch.cat(ys)]
    return tuple(out)


@torch.no_grad()
def _knn_top1(net: nn.Module, xtr, ytr, xva, yva, k: int = 20) -> float:
    """Top-1 (%) of a cosine-similarity k-NN majority vote, written out here (not sslpipe's kNN)."""
    net.eval()
    ftr, fva = F.normalize(net(xtr).flatten(1), dim=1), F.normalize(net(xva).flatten(1), dim=1)
    neighbours = (fva @ ftr.T).topk(k, dim=1).indices
    votes = F.one_hot(ytr[neighbours].long(), 10).sum(1)
    return 100.0 * (votes.argmax(1) == yva).float().mean().item()


def test_random_twin_digits_knn_matches_a_standard_resnet18():
    """Fixed seed: the twin's digits kNN is far above chance (10%) and near torchvision's standard-init
    ResNet-18; the zero-init network the baseline used to be is far below both."""
    torch.manual_seed(0)
    checkpoint = _checkpoint(SimCLR(**SMALL))
    xtr, ytr, xva, yva = _digits_images()
    torch.manual_seed(0)
    twin = build_method(checkpoint, random_init=True).backbone
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)  # zero_init_residual=False by default
    reference.fc = nn.Identity()
    torch.manual_seed(0)
    zero_init = build_backbone("resnet18")[0]
    twin_acc = _knn_top1(twin, xtr, ytr, xva, yva)
    reference_acc = _knn_top1(reference, xtr, ytr, xva, yva)
    zero_acc = _knn_top1(zero_init, xtr, ytr, xva, yva)
    assert twin_acc > 80.0, (twin_acc, reference_acc, zero_acc)  # seeds 0-2: 91-94% (zero-init: 18%)
    assert abs(twin_acc - reference_acc) < 6.0, (twin_acc, reference_acc, zero_acc)
    assert twin_acc > zero_acc + 25.0, (twin_acc, reference_acc, zero_acc)


def test_random_init_evaluation_never_reads_the_trained_features_from_the_cache(tmp_path):
    """kNN of the random twin with a warm cache (the trained model's features already there) equals the same
    evaluation without any cache; the trained score differs, so a key without the init would show."""
    from tests.checkpoints import perturb_, save_method_checkpoint
    from tests.helpers import read_metrics, run_cli

    torch.manual_seed(0)
    method = perturb_(SimCLR(backbone="resnet10t", image_size=8, proj_hidden_dim=16, proj_output_dim=8))
    ckpt = save_method_checkpoint(method, str(tmp_path / "model.ckpt"))
    common = ["knn", "--checkpoint", ckpt, "--data.num_workers", "0", "--trainer.precision", "32-true"]
    common += ["--trainer.default_root_dir", str(tmp_path / "runs")]
    cache = ["--feature_cache", str(tmp_path / "cache")]

    def knn_top1(*extra: str) -> float:
        return read_metrics(run_cli([*common, *extra])[0])["knn_top1"]

    trained = knn_top1(*cache)
    random_warm = knn_top1(*cache, "--random_init", "true")
    random_uncached = knn_top1("--feature_cache", "none", "--random_init", "true")
    assert random_warm == random_uncached != trained
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4  # (trained, random) x (train, val)
