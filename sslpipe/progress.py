"""One progress bar for every long loop outside the Lightning Trainer (which has its own)."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str = "", total: Optional[int] = None) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr (tqdm ships with Lightning); silent when stderr is not a terminal."""
    from tqdm.auto import tqdm

    yield from tqdm(
        iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty() or None
    )
