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
