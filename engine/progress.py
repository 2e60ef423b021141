"""Progress bars for long work (fetching, loading, quantizing); silent when not wanted."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True) -> Iterator[T]:
    """Wraps ``items`` in a bar on stderr, only when enabled and stderr is a terminal."""
    show = enabled and sys.stderr.isatty()
    yield from tqdm(items, total=total, desc=desc, unit=unit, disable=not show,
                    leave=False, dynamic_ncols=True)


def counter(total: int, *, desc: str = "", unit: str = "it", enabled: bool = True) -> tqdm:
    """A bar advanced by hand with ``update(n)``; same visibility rule as progress_bar."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and sys.stderr.isatty()),
                leave=False, dynamic_ncols=True)
