"""Progress bars: tqdm on stderr, hidden when stderr is not a terminal or with -q."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
_enabled: bool | None = None  # None: decide from the terminal


def set_progress(enabled: bool | None) -> None:
    """Force bars on (True), off (False), or back to automatic (None)."""
    global _enabled
    _enabled = enabled


def progress_enabled() -> bool:
    return sys.stderr.isatty() if _enabled is None else _enabled


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "tensor") -> Iterator[T]:
    if not progress_enabled():
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
