"""Reading sslpipe checkpoints: safely (no code runs from the file), from older versions, into a method.

Every checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a
file whose pickle would run code is refused before anything in it executes. Checkpoints written by an
earlier sslpipe (one ``MoCo`` class with a ``mode``; the online probe as a bare ``nn.Linear``; MoCo's
``key_backbone``/``key_projector``) are mapped onto today's classes and parameter names.
"""

from __future__ import annotations

import importlib
import os
import pickle
from typing import Any, Iterable

import torch

from sslpipe.errors import UserError

TRUST_HINT = (
    "sslpipe reads checkpoints with torch.load(weights_only=True) so that a file cannot run code. If you trust "
    "this file, load it yourself with torch.load(path, weights_only=False) and save its 'state_dict' and "
    "'hyper_parameters' again with torch.save."
)


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unsafe to unpickle, or not written by sslpipe."""


def load_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint dict at ``path``, read safely onto the CPU and upgraded to today's layout."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} not found; pass --checkpoint <run dir>/checkpoints/last.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refused to load {path!r}: it holds more than tensors ({reason}). {TRUST_HINT}"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        kind = "a dict without 'state_dict'" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
        raise CheckpointError(f"{path!r} is not a checkpoint written by `sslpipe pretrain` ({kind})")
    check_finite_weights(checkpoint["state_dict"], path)
    return upgrade_checkpoint(checkpoint)


#: Buffers in which NaN means "not estimated yet", not divergence (PIRL's NCE normaliser before its first batch).
NAN_MEANS_UNSET = ("nce_log_z",)


def nonfinite_names(tensors: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the floating-point tensors among ``(name, tensor)`` pairs holding NaN/inf (one host sync), but
    :data:`NAN_MEANS_UNSET`: the one test of "non-finite state" for checkpoints written and read."""
    named = [
        (name, t)
        for name, t in tensors
        if isinstance(t, torch.Tensor) and t.is_floating_point() and name.rsplit(".", 1)[-1] not in NAN_MEANS_UNSET
    ]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def check_finite_weights(state_dict: dict[str, Any], source: str) -> None:
    """Refuse weights with NaN/inf (a diverged run): evaluating or exporting them would only give garbage."""
    bad = nonfinite_names(state_dict.items())
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(
            f"{source!r} holds non-finite (NaN/inf) weights in {', '.join(bad[:3])}{more}: the run diverged before "
            "it was saved; use an earlier checkpoint of the run"
        )


# ---------------------------------------------------------------------------------------------- older versions
_LEGACY_MOCO = "sslpipe.methods.moco.MoCo"
_RENAMED_KEYS = (  # (old prefix, new prefix), first match wins
    ("key_backbone.", "key_encoder.backbone."),
    ("key_projector.", "key_encoder.projector."),
    ("key_step", "key_encoder.num_updates"),
)


def _probe_key(key: str, has_norm: bool) -> str:
    # Before the OnlineProbe component: probe.{weight,bias} (a Linear), or probe.0.* (BatchNorm) + probe.1.*.
    if not key.startswith("probe.") or key.startswith(("probe.linear.", "probe.norm.")):
        return key
    rest = key[len("probe.") :]
    if has_norm:
        index, _, name = rest.partition(".")
        return f"probe.{'norm' if index == '0' else 'linear'}.{name}"
    return f"probe.linear.{rest}"


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Map an older sslpipe checkpoint onto today's class paths, hyper-parameters and parameter names (in place)."""
    hparams = checkpoint.setdefault("hyper_parameters", {})
    if checkpoint.get("sslpipe_method") == _LEGACY_MOCO or hparams.get("_class_path") == _LEGACY_MOCO:
        mode = hparams.pop("mode", "v2")
        checkpoint["sslpipe_method"] = f"sslpipe.methods.MoCoV{mode[-1]}"
        hparams.pop("_class_path", None)
        batch_norm = hparams.pop("proj_batch_norm", None)
        if mode == "v2":
            hparams["proj_batch_norm"] = bool(batch_norm)  # None meant the paper's choice: none for v2
            hparams.pop("pred_hidden_dim", None)
            hparams.pop("freeze_patch_embed", None)
        else:
            hparams.pop("queue_size", None)
    state = checkpoint.get("state_dict")
    if state is not None:
        has_norm = "probe.0.running_mean" in state
        upgraded = {}
        for key, value in state.items():
            for old, new in _RENAMED_KEYS:
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
            upgraded[_probe_key(key, has_norm)] = value
        checkpoint["state_dict"] = upgraded
        if has_norm:
            hparams.setdefault("probe_batch_norm", True)
    return checkpoint


# ---------------------------------------------------------------------------------------------- methods
#: How ``random_init`` initialises, for feature-cache keys: random-init features cached by an earlier sslpipe
#: (zero-initialised residual branches) are then not taken for today's baseline. Change it with the init.
RANDOM_INIT_SCHEME = "standard_init"


def load_method(checkpoint_path: str, random_init: bool = False) -> Any:
    """Rebuild the :class:`~sslpipe.methods.SSLMethod` stored in ``checkpoint_path`` (any subclass), on the CPU.

    With ``random_init`` the same architecture is built from the stored hyper-parameters and left at a
    (seeded) standard initialisation: the random-init baseline for evaluation (see :func:`build_method`).
    """
    return build_method(load_checkpoint(checkpoint_path), random_init, source=checkpoint_path)


def build_method(checkpoint: dict[str, Any], random_init: bool = False, source: str = "the checkpoint") -> Any:
    """The method a checkpoint dict (:func:`load_checkpoint`) describes, with its weights unless ``random_init``.

    ``random_init`` is the fair random baseline: none of the checkpoint's weights, and
    :func:`~sslpipe.backbones.standard_init_` undoes the zero-initialised residual branches that training
    starts from (timm ResNets' ``zero_init_last``), which would leave every block an identity.
    """
    from sslpipe.backbones import standard_init_
    from sslpipe.methods.base import SSLMethod

    path = checkpoint.get("sslpipe_method") or checkpoint["hyper_parameters"].get("_class_path")
    if path is None:
        raise CheckpointError(f"{source!r} was not written by an sslpipe method (no 'sslpipe_method' entry)")
    module_name, cls_name = path.rsplit(".", 1)
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        raise CheckpointError(
            f"{source!r} holds method {path!r}, which this version of sslpipe does not have"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, SSLMethod)):
        raise CheckpointError(f"{source!r} names {path!r}, which is not an SSLMethod")
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    model = cls(**hparams)
    if random_init:
        standard_init_(model)
    else:
        model.load_state_dict(checkpoint["state_dict"])
    return model
