"""Raw stored elements and reused buffers for the native route of `surgeon apply`'s methods."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy

from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import pread_into
from surgeon.ops import native_gta

RAW = {"F32": numpy.float32, "F16": numpy.uint16, "BF16": numpy.uint16}  # the dtypes the native kernels read


def read_raw(ckpt: Checkpoint, name: str, start: int, stop: int, dtype: str | None = None) -> numpy.ndarray:
    """Flat stored elements [start, stop) of an F32/F16/BF16 tensor, raw (16-bit ones as uint16)."""
    info = ckpt.info(name)
    out = numpy.empty(stop - start, dtype=RAW[dtype or info.dtype])
    if out.size:
        fd, offset, _ = ckpt.fd_and_span(name)
        pread_into(fd, memoryview(out).cast("B"), offset + start * out.itemsize, info.file)
    return out


class ScratchPool:
    """(|τ|, index) pair buffers handed out and taken back, so that tensor after tensor reuses the same pages
    (a fresh large allocation costs a page fault per 4 KB); at most ``keep`` are kept, the largest."""

    def __init__(self, keep: int = 2) -> None:
        self._free: list[numpy.ndarray] = []
        self._lock = threading.Lock()
        self._keep = keep

    @contextmanager
    def take(self, numel: int) -> Iterator[numpy.ndarray]:
        with self._lock:
            fits = [i for i, free in enumerate(self._free) if free.size >= numel]
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].size)) if fits else None
        if buf is None:
            buf = native_gta.pairs_buffer(numel)
        try:
            yield buf[:numel]
        finally:
            with self._lock:
                self._free.append(buf)
                self._free.sort(key=lambda b: -b.size)
                del self._free[self._keep:]
