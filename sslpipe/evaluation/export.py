"""``sslpipe export``: a pretrained backbone as safetensors for plain timm / torchvision, plus a JSON model card.

The file holds the backbone's ``state_dict`` (the ``backbone.*`` entries of the checkpoint: for MoCo the
query encoder, never the momentum key encoder; BatchNorm buffers included) and loads with
``load_state_dict(..., strict=True)`` into the library's own model built *without a classifier*:

* timm: ``timm.create_model(name, num_classes=0, **kwargs)`` has no ``head``/``fc`` weights;
* torchvision: ``torchvision.models.<name>(**kwargs)`` with its classifier attribute replaced by
  ``torch.nn.Identity()`` before loading (torchvision has no ``num_classes=0``).

The card's ``load`` snippet spells out those lines, and the extra ones where sslpipe changed the model:
``cifar_stem`` (the two lines that swap ``conv1``/``maxpool``), a ViT's ``img_size``/``patch_size``, and the
masked methods' pooling (``global_pool="token"`` for ``pool: cls``; ``global_pool="avg", fc_norm=False`` for
``pool: mean``, i.e. the mean of the final-LayerNorm patch tokens, which timm's default ``avg`` would
LayerNorm after pooling instead). Their fixed sin-cos position codes load as the ordinary ``pos_embed``.

Before anything is written, the snippet itself is executed on the exported tensors and the resulting
model's features are compared with sslpipe's ``forward`` on a random batch: an export that the card
cannot reproduce is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import torch
from torch import nn

from sslpipe.checkpoints import build_method, load_checkpoint

ExportFormat = Literal["timm", "torchvision"]
# Classifier attributes, in the order sslpipe's backbone builder looks for them.
HEAD_ATTRIBUTES = ("fc", "classifier", "heads", "head")
PROBE_METRIC_PREFIXES = ("online_linear_", "linear_", "knn_", "kmeans_")


@dataclass
class ExportSpec:
    """How to rebuild the backbone in the target library (what the card's snippet does)."""

    library: ExportFormat
    name: str
    kwargs: dict[str, Any]
    head: Optional[str] = None  # torchvision: the classifier attribute set to nn.Identity()
    cifar_stem: Optional[tuple[int, int]] = None  # (in_channels, out_channels) of the 3x3 stride-1 conv1
    notes: list[str] = field(default_factory=list)


def backbone_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``backbone.*`` entries (prefix removed), contiguous and unshared, ready for safetensors."""
    prefix = "backbone."
    state = {k[len(prefix) :]: v.contiguous().clone() for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError("the checkpoint has no 'backbone.*' weights; was it written by an sslpipe method?")
    return state


def export_spec(method: nn.Module, format: Optional[str] = None) -> ExportSpec:
    """Which model of which library reproduces ``method.backbone`` (and ``method.forward``'s pooling)."""
    from sslpipe.methods.masked import MaskedImageModel

    hp = method.hparams
    source = "torchvision" if hp.backbone.startswith("torchvision/") else "timm"
    library = format or source
    if library not in ("timm", "torchvision"):
        raise ValueError(f"--format must be 'timm' or 'torchvision', got {library!r}")
    name = hp.backbone.split("/", 1)[1] if source == "torchvision" else hp.backbone
    kwargs: dict[str, Any] = dict(hp.backbone_kwargs or {})
    notes: list[str] = []
    backbone = method.backbone
    if library == "timm":
        import timm

        if not timm.is_model(name):
            raise ValueError(
                f"timm has no model {name!r} (the checkpoint's backbone is {hp.backbone!r}); use --format {source}"
            )
        kwargs = {"num_classes": 0, **kwargs}
        embed = getattr(backbone, "patch_embed", None)
        if embed is not None and getattr(embed, "img_size", None) is not None:
            kwargs["img_size"] = (
                int(embed.img_size[0]) if embed.img_size[0] == embed.img_size[1] else tuple(embed.img_size)
            )
            grid = tuple(int(g) for g in embed.grid_size)
            notes.append(
                f"ViT at img_size={kwargs['img_size']} with {tuple(embed.patch_size)} patches: pos_embed has a "
                f"{grid} grid (+ class token); other input sizes need timm's dynamic_img_size or resampled "
                "position embeddings."
            )
        head = None
    else:
        import torchvision

        if not hasattr(torchvision.models, name):
            raise ValueError(
                f"torchvision has no model {name!r} (the checkpoint's backbone is {hp.backbone!r}); "
                f"use --format {source}"
            )
        plain = getattr(torchvision.models, name)(**kwargs)
        head = next((h for h in HEAD_ATTRIBUTES if hasattr(plain, h)), None)
        if head is None:
            raise ValueError(f"torchvision's {name!r} has none of the classifier attributes {HEAD_ATTRIBUTES}")
    if isinstance(method, MaskedImageModel):
        if library != "timm":
            raise ValueError(f"{type(method).__name__} trains a timm ViT; export it with --format timm")
        # sslpipe's masked models pool in their own forward: cls token, or the mean of the normalised patch tokens.
        kwargs.update({"global_pool": "token"} if method.pool == "cls" else {"global_pool": "avg", "fc_norm": False})
        notes.append(
            f"pos_embed holds the fixed 2-D sin-cos codes {type(method).__name__} trained with; "
            f"pooling as sslpipe's pool={method.pool!r}: global_pool={kwargs['global_pool']!r}"
            + (", fc_norm=False (mean of the final-LayerNorm patch tokens)" if method.pool == "mean" else "")
        )
    stem = None
    if hp.cifar_stem:
        conv = backbone.conv1
        stem = (int(conv.in_channels), int(conv.out_channels))
        notes.append("cifar_stem: conv1 is a 3x3 stride-1 convolution and there is no max-pool (32-px images).")
    return ExportSpec(library, name, kwargs, head, stem, notes)


def load_snippet(spec: ExportSpec, weights_file: str) -> str:
    """Python that builds the plain library model and loads the exported file into it with ``strict=True``."""
    args = ", ".join([repr(spec.name)] + [f"{k}={v!r}" for k, v in spec.kwargs.items()])
    lines = ["import torch", "from safetensors.torch import load_file"]
    if spec.library == "timm":
        lines += ["import timm", "", f"model = timm.create_model({args})"]
    else:
        builder_args = ", ".join(f"{k}={v!r}" for k, v in spec.kwargs.items())
        lines += [
            "import torchvision",
            "",
            f"model = torchvision.models.{spec.name}({builder_args})",
            f"model.{spec.head} = torch.nn.Identity()  # features, not class scores",
        ]
    if spec.cifar_stem is not None:
        c_in, c_out = spec.cifar_stem
        lines += [
            "# sslpipe's cifar_stem: 3x3 stride-1 conv1, no max-pool",
            f"model.conv1 = torch.nn.Conv2d({c_in}, {c_out}, kernel_size=3, stride=1, padding=1, bias=False)",
            "model.maxpool = torch.nn.Identity()",
        ]
    lines += [f"model.load_state_dict(load_file({weights_file!r}), strict=True)", "model.eval()"]
    return "\n".join(lines) + "\n"


def build_from_snippet(snippet: str) -> nn.Module:
    """Run a :func:`load_snippet` and return its ``model``."""
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "<sslpipe export snippet>", "exec"), namespace)  # noqa: S102 - our own generated code
    return namespace["model"]


@torch.no_grad()
def check_features(method: nn.Module, plain: nn.Module, image_size: int, batch: int = 2) -> float:
    """Largest absolute difference between sslpipe's and the plain model's features on a random batch.

    Raises ``RuntimeError`` when they differ beyond float round-off.
    """
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    expected, got = method.eval()(x).float(), plain.eval()(x).float()
    if expected.shape != got.shape:
        raise RuntimeError(
            f"the exported model gives features of shape {tuple(got.shape)}, sslpipe {tuple(expected.shape)}"
        )
    diff = float((expected - got).abs().max())
    if diff > 1e-4 * max(1.0, float(expected.abs().max())):
        raise RuntimeError(f"the exported model's features differ from sslpipe's by up to {diff:.3g}; not exported")
    return diff


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def _run_metrics(checkpoint: str) -> dict[str, Any]:
    """``metrics.json`` of the pretraining run that wrote ``checkpoint`` (``<run>/checkpoints/x.ckpt``), if any."""
    ckpt_dir = os.path.dirname(os.path.abspath(checkpoint))
    path = os.path.join(os.path.dirname(ckpt_dir), "metrics.json")
    if os.path.basename(ckpt_dir) != "checkpoints" or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def model_card(
    ckpt: dict[str, Any], method: nn.Module, spec: ExportSpec, checkpoint: str, weights_file: str
) -> dict[str, Any]:
    """The JSON model card: what was trained on what, how to load it, the normalisation, probe metrics."""
    from sslpipe.data.datasets import dataset_spec

    hp = method.hparams
    data_hp = {k: v for k, v in (ckpt.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    run = _run_metrics(checkpoint)
    data: dict[str, Any] = {"image_size": data_hp.get("image_size") or hp.image_size}
    if "dataset" in data_hp:
        ds = dataset_spec(data_hp["dataset"])
        size = data.get("image_size") or ds.default_image_size
        data.update(
            dataset=data_hp["dataset"],
            root=data_hp.get("root"),
            image_size=size,
            mean=list(ds.mean),
            std=list(ds.std),
            eval_transform=f"resize the short side to {round(size * ds.eval_resize_ratio)}, centre-crop {size}, "
            "scale to [0, 1], normalise with mean/std",
        )
    metrics = {k: v for k, v in run.items() if k.startswith(PROBE_METRIC_PREFIXES) and not isinstance(v, (list, dict))}
    return {
        "file": os.path.basename(weights_file),
        "sha256": _sha256(weights_file),
        "format": spec.library,
        "model": {"library": spec.library, "name": spec.name, "kwargs": spec.kwargs, "head": spec.head or "none"},
        "feature_dim": int(method.feature_dim),
        "method": type(method).method_label(),
        "method_class": f"{type(method).__module__}.{type(method).__qualname__}",
        "backbone": hp.backbone,
        "cifar_stem": bool(hp.cifar_stem),
        "patch_size": _patch_size(method),
        "pool": getattr(method, "pool", None),
        "epochs": run.get("epochs"),
        "checkpoint_epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "checkpoint": os.path.abspath(checkpoint),
        "data": data,
        "metrics": metrics,
        "notes": spec.notes,
        "load": load_snippet(spec, os.path.basename(weights_file)),
    }


def _patch_size(method: nn.Module) -> Optional[int]:
    embed = getattr(method.backbone, "patch_embed", None)
    return int(embed.patch_size[0]) if embed is not None and hasattr(embed, "patch_size") else None


def export_backbone(checkpoint: str, output: str, format: Optional[ExportFormat] = None) -> tuple[str, str]:
    """Write ``output`` (safetensors) and its card ``<output stem>.json``; return both paths.

    Args:
        checkpoint: a checkpoint written by ``sslpipe pretrain`` (read with ``weights_only=True``).
        output: the ``.safetensors`` file to write.
        format: ``timm`` or ``torchvision``; default: the library the backbone came from. A ResNet
            trained as ``torchvision/resnet50`` exports as timm's ``resnet50`` (same layout) and vice versa.
    """
    from safetensors.torch import save_file

    ckpt = load_checkpoint(checkpoint)
    method = build_method(ckpt, source=checkpoint).eval()
    spec = export_spec(method, format)
    state = backbone_state_dict(ckpt)
    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    tmp = f"{output}.tmp{os.getpid()}"
    try:
        save_file(state, tmp, metadata={"format": "pt", "library": spec.library, "model": spec.name})
        try:
            plain = build_from_snippet(load_snippet(spec, tmp))
        except RuntimeError as err:  # strict loading failed: the card's recipe does not rebuild this backbone
            raise RuntimeError(
                f"{spec.library} model {spec.name!r} built with {spec.kwargs} does not take the exported weights "
                f"strictly, so the export was refused: {err}"
            ) from None
        missing = sorted(set(plain.state_dict()) - set(state))  # BatchNorm fills num_batches_tracked quietly
        if missing:
            raise RuntimeError(f"the exported file lacks entries the plain model has: {missing[:5]}; not exported")
        check_features(method, plain, int(method.hparams.image_size))
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    card_path = os.path.splitext(output)[0] + ".json"
    with open(card_path, "w") as f:
        json.dump(model_card(ckpt, method, spec, checkpoint, output), f, indent=2)
    return output, card_path


def main(argv: Sequence[str]) -> str:
    """``sslpipe export --checkpoint CKPT [--format timm|torchvision] --output FILE``; returns the written file."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="sslpipe export",
        description="Backbone weights as safetensors for plain timm/torchvision, with a JSON model card beside them.",
    )
    ap.add_argument("--checkpoint", required=True, help="checkpoint written by `sslpipe pretrain`")
    ap.add_argument(
        "--format", choices=("timm", "torchvision"), default=None, help="target library (default: the backbone's own)"
    )
    ap.add_argument("--output", required=True, help="the .safetensors file to write; the card goes to <stem>.json")
    args = ap.parse_args(list(argv))
    weights, card = export_backbone(args.checkpoint, args.output, args.format)
    print(f"backbone: {weights}\nmodel card (with the loading code): {card}")
    return weights
