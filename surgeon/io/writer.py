"""Streaming, crash-safe writing of sharded safetensors checkpoints.

The plan comes first: every tensor's name, dtype and shape are known before a
byte is written, so each shard's header is computed up front and tensors are
streamed into place as they are produced (never a whole model in memory).

Crash safety: shard data goes into anonymous ``O_TMPFILE`` files in the target's
parent folder, which the kernel frees if the process dies (``kill -9``
included). Only after every shard is complete and fsynced are they linked
into a hidden staging folder beside the target, re-validated against the
index, and the folder is renamed into place. Where ``O_TMPFILE`` is not
available, the staging folder holds the shards from the start and leftovers
of a killed run are removed by the next run.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from surgeon.errors import CheckpointFormatError, OutputError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import DTYPES, build_header, st_dtype

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
_STAGING_MARK = ".surgeon-staging-"
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorSpec:
    """What will be written: a tensor's name, safetensors dtype string and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2*2**30, '300MB', '1000' (bytes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise OutputError(f"shard size {text!r} is not a size; write it like 5GB, 500MB or 2GiB.")
    number, unit = float(m.group(1)), m.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(number * scale)
    if size <= 0:
        raise OutputError(f"shard size {text!r} must be positive.")
    return size


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors (in order) into shards of at most ``max_shard_size`` data bytes.

    A tensor larger than the budget gets a shard of its own, as in transformers.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int, prefix: str = "model") -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _is_within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(out: Path, inputs: Iterable[Path], *, overwrite: bool) -> None:
    """Refuse outputs that would clobber an input or a non-empty folder."""
    target = out.resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if _is_within(target, src) or _is_within(src, target):
            raise OutputError(
                f"{out}: the output overlaps the input {inp}; surgeon never writes over its inputs. "
                "Choose another output folder."
            )
    if target.exists():
        if target.is_file() and not str(out).endswith(".safetensors"):
            raise OutputError(f"{out}: exists and is a file; choose a folder name for the output.")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise OutputError(f"{out}: output folder is not empty; choose another or pass --overwrite to replace it.")
        if target.is_file() and not overwrite:
            raise OutputError(f"{out}: output file exists; choose another or pass --overwrite to replace it.")
    if target.parent.exists() and not target.parent.is_dir():
        raise OutputError(f"{out}: {target.parent} is a file, not a folder; choose another output path.")
    target.parent.mkdir(parents=True, exist_ok=True)


def clean_stale_staging(parent: Path) -> None:
    """Remove staging folders left by killed runs (their process is gone)."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if _STAGING_MARK not in entry.name or not entry.is_dir():
            continue
        pid_text = entry.name.rsplit("-", 2)[-2] if entry.name.count("-") >= 2 else ""
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _ShardFile:
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


class CheckpointWriter:
    """Write a checkpoint folder (or one ``.safetensors`` file) by streaming tensors.

    >>> specs = [TensorSpec("w", "F32", (2, 2))]                    # doctest: +SKIP
    >>> with CheckpointWriter("out", specs, inputs=["in"]) as w:
    ...     w.write("w", torch.zeros(2, 2))

    Tensors must be written in ``specs`` order. Leaving the ``with`` block
    normally validates and publishes the output; an exception discards it.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        *,
        inputs: Iterable[str | os.PathLike[str]] = (),
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
        extra_files: Iterable[Path] = (),
        extra_texts: dict[str, str] | None = None,
        overwrite: bool = False,
        prefix: str = "model",
    ) -> None:
        self.out = Path(out)
        self.single_file = self.out.suffix == ".safetensors"
        self.specs = list(specs)
        self._by_name = {s.name: s for s in self.specs}
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise CheckpointFormatError(f"{self.out}: tensor {dup!r} would be written twice.")
        check_output(self.out, [Path(p) for p in inputs], overwrite=overwrite)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.extra_files = list(extra_files)
        self.extra_texts = dict(extra_texts or {})
        budget = parse_size(max_shard_size)
        self.shards = [self.specs] if self.single_file else plan_shards(self.specs, budget)
        self.names = [self.out.name] if self.single_file else shard_names(len(self.shards), prefix)
        self.prefix = prefix
        self.parent = self.out.resolve().parent
        clean_stale_staging(self.parent)
        self.staging = self.parent / f".{self.out.name}{_STAGING_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        self._order = iter([(i, spec) for i, shard in enumerate(self.shards) for spec in shard])
        self._files: list[_ShardFile] = []
        self._current = -1
        self._done = False

    # -- streaming ----------------------------------------------------------------------------
    def _next(self, name: str, dtype: str, shape: tuple[int, ...]) -> int:
        try:
            shard_idx, spec = next(self._order)
        except StopIteration:
            raise CheckpointFormatError(f"{self.out}: tensor {name!r} was not planned for writing.") from None
        if spec.name != name:
            raise CheckpointFormatError(f"{self.out}: expected tensor {spec.name!r} next, got {name!r}.")
        if spec.dtype != dtype or spec.shape != tuple(shape):
            raise CheckpointFormatError(
                f"{self.out}: tensor {name!r} was planned as {spec.dtype}{list(spec.shape)} but is {dtype}{list(shape)}."
            )
        self._start_writeback()
        while self._current < shard_idx:
            self._open_shard(self._current + 1)
        return shard_idx

    def _start_writeback(self) -> None:
        """Let the kernel start writing what the current shard holds so far, so that the fsync at the end
        has little left to wait for (the disk works while we compute)."""
        if self._files:
            shard = self._files[-1]
            end = os.lseek(shard.fd, 0, os.SEEK_CUR)
            start_writeback(shard.fd, shard.flushed, end - shard.flushed)
            shard.flushed = end

    def _open_shard(self, idx: int) -> None:
        shard = _ShardFile(self.parent, self.staging / self.names[idx])
        specs = [(s.name, s.dtype, tuple(s.shape)) for s in self.shards[idx]]
        header, _ = build_header(specs, self.metadata)
        shard.write(header)
        self._files.append(shard)
        self._current = idx

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (its dtype and shape must match the plan)."""
        self._next(name, st_dtype(tensor.dtype), tuple(tensor.shape))
        self._files[-1].write(tensor_bytes(tensor))

    def write_raw(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Append already-serialized bytes for a planned tensor."""
        spec = self._by_name[name]
        if len(data) != spec.nbytes:
            raise CheckpointFormatError(f"{self.out}: tensor {name!r} needs {spec.nbytes} bytes, got {len(data)}.")
        self._next(name, spec.dtype, spec.shape)
        self._files[-1].write(data)

    def reserve(self, name: str) -> tuple[int, int]:
        """Claim the next planned tensor's place without writing it: ``(fd, offset)`` for the caller to
        fill with ``pwrite`` (all of its bytes, from any thread) before the writer is finished."""
        spec = self._by_name.get(name)
        if spec is None:
            raise CheckpointFormatError(f"{self.out}: tensor {name!r} was not planned for writing.")
        self._next(name, spec.dtype, spec.shape)
        return self._claim(spec.nbytes)

    def _claim(self, nbytes: int) -> tuple[int, int]:
        fd = self._files[-1].fd
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        os.lseek(fd, nbytes, os.SEEK_CUR)
        return fd, offset

    def copy_from(self, source: Checkpoint, name: str, as_name: str | None = None) -> None:
        """Copy a tensor's bytes unchanged from ``source`` (in-kernel where possible)."""
        info = source.info(name)
        self._next(as_name or name, info.dtype, info.shape)
        copy_span(source, name, *self._claim(info.nbytes))

    # -- finishing ----------------------------------------------------------------------------
    def _finish(self) -> None:
        leftover = next(self._order, None)
        if leftover is not None:
            raise CheckpointFormatError(f"{self.out}: tensor {leftover[1].name!r} was planned but never written.")
        while self._current < len(self.shards) - 1:  # shards that hold only empty tensors
            self._open_shard(self._current + 1)
        self.staging.mkdir(exist_ok=True)
        for shard, name in zip(self._files, self.names):
            shard.link(self.staging / name)
        if not self.single_file:
            self._write_sidecars()
        self._validate()
        self._fsync_dir(self.staging)
        self._publish()
        self._done = True

    def _write_sidecars(self) -> None:
        for src in self.extra_files:
            shutil.copyfile(src, self.staging / src.name)
        for fname, text in self.extra_texts.items():
            (self.staging / fname).write_text(text, "utf-8")
        if len(self.names) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.specs), **{
                    k: v for k, v in self.metadata.items() if k != "format"}},
                "weight_map": {s.name: self.names[i] for i, shard in enumerate(self.shards) for s in shard},
            }
            (self.staging / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", "utf-8")
        mode = 0o666 & ~_umask()
        for p in self.staging.iterdir():
            os.chmod(p, mode)
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())

    def _validate(self) -> None:
        """Re-read every written header and compare with the plan and the index."""
        target = self.staging / self.names[0] if self.single_file else self.staging
        with Checkpoint.open(target) as written:
            if sorted(written.keys()) != sorted(s.name for s in self.specs):
                raise CheckpointFormatError(f"{self.out}: written shards do not hold the planned tensors; nothing was published.")
            for spec in self.specs:
                info = written.info(spec.name)
                if info.dtype != spec.dtype or info.shape != spec.shape:
                    raise CheckpointFormatError(f"{self.out}: written tensor {spec.name!r} does not match the plan.")

    def _publish(self) -> None:
        target = self.out.resolve()
        source = self.staging / self.names[0] if self.single_file else self.staging
        old = None
        if target.exists():
            old = self.parent / f".{self.out.name}{_STAGING_MARK}{os.getpid()}-old{secrets.token_hex(2)}"
            os.rename(target, old)
        os.rename(source, target)
        if self.single_file:
            shutil.rmtree(self.staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        self._fsync_dir(self.parent)

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        for shard in self._files:
            shard.discard()
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()

    @property
    def shard_files(self) -> list[str]:
        return list(self.names)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
