"""Command line entry point: ``sslpipe COMMAND [options]``.

Each command is a function ``fn(argv) -> Optional[str]`` in the module that owns its idea; this file
only dispatches. A command that creates a run directory returns it, and it is printed as the last
line on rank 0 (scripts read it with ``tail -n 1``).

A :class:`~sslpipe.errors.UserError` (bad data, bad settings) is printed as its message alone and exits
with status 2; ``--debug`` (anywhere on the line) or ``SSLPIPE_DEBUG=1`` shows its traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional, Sequence

# name -> ("module:function", one-line help). Imported lazily: `sslpipe --help` stays instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": (
        "sslpipe.pretrain:main",
        "--config FILE [--key value ...]       self-supervised pretraining (LightningCLI)",
    ),
    "linear": (
        "sslpipe.evaluation.commands:linear",
        "--checkpoint CKPT [--config FILE] ...  linear probe on frozen, cached features",
    ),
    "knn": (
        "sslpipe.evaluation.commands:knn",
        "--checkpoint CKPT [--config FILE] ...  weighted kNN on frozen, cached features",
    ),
    "kmeans": (
        "sslpipe.evaluation.commands:kmeans",
        "--checkpoint CKPT [--config FILE] ...  k-means of val features: NMI, ARI, acc.",
    ),
    "export": (
        "sslpipe.evaluation.export:main",
        "--checkpoint CKPT --output FILE ...    backbone as safetensors for timm/torchvision",
    ),
    "energy": ("sslpipe.energy:main", "[--data spiral|moons|rings] [--k K]    energy landscapes, 4 families, 2-D"),
    "report": (
        "sslpipe.evaluation.report:main",
        "RUN_DIR [...] [--output DIR]           report.md: metrics, curves, energies, embeddings",
    ),
}


def expand_config_bases(argv: Sequence[str]) -> list[str]:
    """Put each ``--config FILE``'s bases (its top-level ``config:`` key, relative to FILE) before it, recursively.

    A config states only its own keys and names the file it builds on (``config: ../base/digits.yaml``).
    jsonargparse applies such a nested file first, but then resets every section the outer file mentions to
    the defaults; ``--config BASE --config FILE`` merges section by section. So a single ``--config FILE``
    becomes ``--config BASE ... --config FILE``: LightningCLI's own composition of several files, in order.
    """
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            path, i = args[i + 1], i + 2
        elif arg.startswith("--config="):
            path, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        for file in _config_chain(path, ()):
            out += ["--config", file]
    return out


def _config_chain(path: str, seen: tuple[str, ...]) -> list[str]:
    """``path`` preceded by its bases, most basic first."""
    import os

    import yaml

    if path in seen:
        raise ValueError(f"config files include each other in a loop: {' -> '.join((*seen, path))}")
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError:
        return [path]  # jsonargparse reports a missing file in its own words
    base = values.get("config") if isinstance(values, dict) else None
    if not isinstance(base, str):
        return [path]
    return [*_config_chain(os.path.join(os.path.dirname(path), base), (*seen, path)), path]


def usage() -> str:
    """The top-level help text, built from :data:`COMMANDS`."""
    lines = [f"usage: sslpipe {{{','.join(COMMANDS)}}} [options]", ""]
    lines += [f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run `sslpipe COMMAND --help` for a command's options; add --debug for tracebacks of user errors."]
    return "\n".join(lines)


def user_message(err: BaseException) -> str:
    """The message of a user error, without the worker traceback a DataLoader worker wraps it in."""
    message = str(err)
    # DataLoader re-raises a worker's error as the same type, its message prefixed by the worker's traceback,
    # whose last line is "<module>.<type>: <original message>".
    marker = f"{type(err).__module__}.{type(err).__qualname__}: "
    return message.rsplit(marker, 1)[1] if "Original Traceback" in message and marker in message else message


def find_user_error(err: BaseException) -> Optional[BaseException]:
    """``err`` if it is a :class:`~sslpipe.errors.UserError`, else the first one it was raised from: jsonargparse
    wraps a constructor's ``ConfigError`` (a class path's ``init_args``) into its own ``ValueError``."""
    from sslpipe.errors import UserError

    seen: set[int] = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point ``sslpipe``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SSLPIPE_DEBUG", "0") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sslpipe: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module, function = COMMANDS[command][0].split(":")
    try:
        run_dir = getattr(importlib.import_module(module), function)(expand_config_bases(rest))
    except Exception as raised:
        err = find_user_error(raised)
        if err is None or debug:
            raise
        print(f"sslpipe {command}: error: {user_message(err)}", file=sys.stderr)
        # a run stopped by a signal exits like a killed process (128 + signal); other user errors with 2
        raise SystemExit(getattr(err, "exit_code", 2)) from None
    if run_dir:
        from pytorch_lightning.utilities import rank_zero_only

        if rank_zero_only.rank == 0:
            print(run_dir, flush=True)


if __name__ == "__main__":
    main()
