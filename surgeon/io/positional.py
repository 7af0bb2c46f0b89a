"""Positional file primitives of the writer: one shard file being written (an anonymous ``O_TMPFILE``
until it is linked into the staging folder), ``pwrite`` of all bytes, in-kernel copies of a
tensor's stored bytes, and the writeback hint. No planning and no publishing here."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from surgeon.errors import CheckpointFormatError
from surgeon.io.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch

_COPY_CHUNK = 64 << 20


class ShardFile:
    """One shard being written: an anonymous O_TMPFILE (or a named staging file)."""

    def __init__(self, parent: Path, fallback_path: Path) -> None:
        self.named: Path | None = None
        self.flushed = 0  # bytes handed to start_writeback so far
        try:
            self.fd = os.open(parent, os.O_TMPFILE | os.O_WRONLY, 0o666)
        except (AttributeError, OSError):
            fallback_path.parent.mkdir(exist_ok=True)
            self.fd = os.open(fallback_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            self.named = fallback_path

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def link(self, dest: Path) -> None:
        os.fsync(self.fd)
        if self.named is None:
            # A dst_dir_fd makes CPython call linkat(AT_SYMLINK_FOLLOW), which gives the anonymous
            # file a name; plain link() would try to link the /proc symlink itself (EXDEV).
            dir_fd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.link(f"/proc/self/fd/{self.fd}", dest.name, dst_dir_fd=dir_fd, follow_symlinks=True)
            finally:
                os.close(dir_fd)
        elif self.named != dest:
            os.replace(self.named, dest)
        os.close(self.fd)
        self.fd = -1

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.named is not None:
            self.named.unlink(missing_ok=True)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` to disk without waiting (Linux
    ``sync_file_range``); a hint only, the final fsync still guarantees durability."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def copy_span(source: Checkpoint, name: str, dst_fd: int, dst_offset: int) -> None:
    """Copy tensor ``name``'s stored bytes from ``source`` to ``dst_fd`` at ``dst_offset`` (in-kernel where
    possible; positional, so from any thread, into a place :meth:`CheckpointWriter.reserve` gave)."""
    info = source.info(name)
    fd, start, length = source.fd_and_span(name)
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(fd, dst_fd, min(length - done, 1 << 30), start + done, dst_offset + done)
        except OSError:
            n = -1
        if n <= 0:
            break
        done += n
    while done < length:
        chunk = os.pread(fd, min(length - done, _COPY_CHUNK), start + done)
        if not chunk:
            raise CheckpointFormatError(f"{info.file}: file ended while copying {name!r}; it was truncated under us.")
        pwrite_all(dst_fd, chunk, dst_offset + done)
        done += len(chunk)


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when contiguous."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())
