"""Errors the user can fix (bad settings, bad data on disk).

``sslpipe`` (:func:`sslpipe.cli.main`) prints a :class:`UserError`'s message alone on stderr, with no
traceback, and exits with status 2; ``--debug`` or ``SSLPIPE_DEBUG=1`` re-raises it with the traceback.
Every message names the bad value and the fix. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: the message alone tells the user what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A setting (flag or config key) is invalid or inconsistent with another."""


class DataError(UserError):
    """The data on disk cannot be used as it is (unreadable images, empty or mismatched class folders)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset folder or file is missing."""


def check_positive(key: str, value: float, fix: str = "") -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``value > 0`` (sizes, widths, temperatures, batch sizes)."""
    if not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f"{key}={value!r} is invalid: it must be > 0{'; ' + fix if fix else ''}")


def check_open_unit(key: str, value: float) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``0 < value < 1`` (mask ratios)."""
    if not (isinstance(value, (int, float)) and 0 < value < 1):
        raise ConfigError(f"{key}={value!r} is invalid: it must lie strictly between 0 and 1 (e.g. 0.75)")


def check_choice(key: str, value: object, choices: "list | tuple") -> None:
    """Raise :class:`ConfigError` naming ``key`` and the valid ``choices`` unless ``value`` is one of them."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is invalid: choose one of {', '.join(map(repr, choices))}")
