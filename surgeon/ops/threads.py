"""torch's intra-op thread count scoped to a block: set on the way in, restored on the way out, error or not."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch on ``threads`` intra-op threads for the block (None: as it is), then the previous count back."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def one_cpu_thread(device: Any) -> contextlib.AbstractContextManager[None]:
    """One compute thread when ``device`` is a CPU (a reader thread keeps the other cores busy: two compute
    threads on top oversubscribe them); on an accelerator, unchanged."""
    return torch_threads(1 if torch.device(device).type == "cpu" else None)


__all__ = ["one_cpu_thread", "torch_threads"]
