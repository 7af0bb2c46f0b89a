"""Streaming, crash-safe writing of sharded safetensors checkpoints: the positional writes, the
staging and the publish. Where each tensor goes is planned first (:mod:`surgeon.io.layout`), so
every shard's header is known before a byte is written and tensors are streamed into place as they
are produced (never a whole model in memory).

Crash safety: shard data goes into anonymous ``O_TMPFILE`` files in the target's parent folder,
which the kernel frees if the process dies (``kill -9`` included). Only after every shard is
complete and fsynced are they linked into a hidden staging folder beside the target, re-validated
against the plan, and the folder is swapped into place (:mod:`surgeon.io.staging`). Where
``O_TMPFILE`` is not available, the staging folder holds the shards from the start and leftovers of
a killed run are removed by the next run. The rules every output follows (not into an input, a lock
per target, free space, one-line disk errors) are in :mod:`surgeon.io.output`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from surgeon.errors import CheckpointFormatError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import st_dtype
from surgeon.io.layout import (
    DEFAULT_MAX_SHARD_SIZE,
    TensorSpec,
    parse_size,
    plan_layout,
    plan_shards,
    shard_lengths,
    shard_names,
)
from surgeon.io.output import (
    acquire_lock,
    check_free_space,
    check_not_input,
    check_output,
    current_guard,
    disk_error,
    refuse_non_finite,
    release_lock,
    remove_empty,
    show,
    signals_as_interrupts,
    signals_deferred,
)
from surgeon.io.positional import ShardFile, copy_span, pwrite_all, start_writeback, tensor_bytes
from surgeon.io.staging import STAGING_MARK, clean_stale_staging, current_umask, fsync_dir, publish, staging_name

if TYPE_CHECKING:
    import torch

_STAGING_MARK = STAGING_MARK  # the old private name, still imported by callers
__all__ = ["DEFAULT_MAX_SHARD_SIZE", "CheckpointWriter", "TensorSpec", "check_output", "clean_stale_staging",
           "copy_span", "parse_size", "plan_shards", "pwrite_all", "shard_names", "start_writeback", "tensor_bytes"]


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
        allow_non_finite: bool = False,
    ) -> None:
        self.out = Path(out)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.layout = plan_layout(self.out, specs, max_shard_size=max_shard_size, metadata=self.metadata,
                                  prefix=prefix)
        self.single_file = self.layout.single_file
        self.specs = list(self.layout.specs)
        self._by_name = {s.name: s for s in self.specs}
        self.shards = [list(s) for s in self.layout.shards]
        self.names = list(self.layout.names)
        self.prefix = prefix
        self.extra_files = list(extra_files)
        self.extra_texts = dict(extra_texts or {})
        parents_before = _missing_parents(self.out.resolve().parent)
        self.target = check_output(self.out, [Path(p) for p in inputs], overwrite=overwrite)
        self._created = [p for p in parents_before if p.exists()]
        self.parent = self.target.parent
        guard = current_guard()
        self.allow_non_finite = allow_non_finite or bool(guard is not None and guard.allow_non_finite)
        self._locked = guard is None  # in a guard, check_output took the lock for the whole command
        if self._locked:
            acquire_lock(self.target)
        try:
            sidecars = sum(p.stat().st_size for p in self.extra_files) + sum(
                len(t.encode("utf-8")) for t in self.extra_texts.values())
            self.needed = self.layout.total_bytes + sidecars + len(self.layout.index_text() or "")
            check_free_space(self.target, self.needed)
        except BaseException:
            self._unlock()
            remove_empty(self._created)
            raise
        self.staging = self.parent / staging_name(self.out.name)
        self._order = iter([(i, spec) for i, shard in enumerate(self.shards) for spec in shard])
        self._files: list[ShardFile] = []
        self._current = -1
        self._done = False
        self._signals: contextlib.ExitStack | None = None
        self._shared = False

    @contextlib.contextmanager
    def _disk(self) -> Iterator[None]:
        """A full, read-only or forbidden disk as one line naming the output and the bytes needed."""
        try:
            yield
        except OSError as exc:
            raise disk_error(exc, self.out, self.needed) from exc

    # -- streaming ----------------------------------------------------------------------------
    def _next(self, name: str, dtype: str, shape: tuple[int, ...]) -> int:
        try:
            shard_idx, spec = next(self._order)
        except StopIteration:
            raise CheckpointFormatError(f"{show(self.out)}: tensor {name!r} was not planned for writing.") from None
        if spec.name != name:
            raise CheckpointFormatError(f"{show(self.out)}: expected tensor {spec.name!r} next, got {name!r}.")
        if spec.dtype != dtype or spec.shape != tuple(shape):
            raise CheckpointFormatError(
                f"{show(self.out)}: tensor {name!r} was planned as {spec.dtype}{list(spec.shape)} but is "
                f"{dtype}{list(shape)}.")
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
        with self._disk():
            shard = ShardFile(self.parent, self.staging / self.names[idx])
            self._files.append(shard)
            shard.write(self.layout.headers[idx])
        self._current = idx

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (its dtype and shape must match the plan); NaN/Inf refused unless allowed."""
        self._next(name, st_dtype(tensor.dtype), tuple(tensor.shape))
        self.check_finite(name, tensor)
        with self._disk():
            self._files[-1].write(tensor_bytes(tensor))

    def check_finite(self, name: str, tensor: torch.Tensor) -> None:
        """Refuse NaN/Inf in (a block of) tensor ``name`` unless allowed; for callers that ``pwrite`` into a
        place from :meth:`reserve` themselves."""
        if not self.allow_non_finite:
            refuse_non_finite(tensor, where=self.out, name=name)

    def write_raw(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Append already-serialized bytes for a planned tensor."""
        spec = self._by_name[name]
        if len(data) != spec.nbytes:
            raise CheckpointFormatError(f"{show(self.out)}: tensor {name!r} needs {spec.nbytes} bytes, got {len(data)}.")
        self._next(name, spec.dtype, spec.shape)
        with self._disk():
            self._files[-1].write(data)

    def reserve(self, name: str) -> tuple[int, int]:
        """Claim the next planned tensor's place without writing it: ``(fd, offset)`` for the caller to
        fill with ``pwrite`` (all of its bytes, from any thread) before the writer is finished."""
        spec = self._by_name.get(name)
        if spec is None:
            raise CheckpointFormatError(f"{show(self.out)}: tensor {name!r} was not planned for writing.")
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
        with self._disk():
            copy_span(source, name, *self._claim(info.nbytes))

    def share(self) -> Path:
        """Make every shard a named file in the staging folder, header written and length set, so that
        other processes can ``pwrite`` their tensors into it (:mod:`surgeon.io.shared_output`); the
        writer then takes no tensors itself and, on finishing, checks the headers, fsyncs, publishes."""
        with self._disk():
            self.staging.mkdir()
            for name, header, length in zip(self.names, self.layout.headers, shard_lengths(self.layout)):
                fd = os.open(self.staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                try:
                    pwrite_all(fd, header, 0)
                    os.ftruncate(fd, length)
                finally:
                    os.close(fd)
        self._shared = True
        return self.staging

    def _finish_shared(self) -> None:
        with self._disk():
            for name in self.names:
                fd = os.open(self.staging / name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if not self.single_file:
                self._write_sidecars()

    # -- finishing ----------------------------------------------------------------------------
    def _finish(self) -> None:
        if self._shared:
            self._finish_shared()
            self._publish()
            return
        leftover = next(self._order, None)
        if leftover is not None:
            raise CheckpointFormatError(f"{show(self.out)}: tensor {leftover[1].name!r} was planned but never written.")
        while self._current < len(self.shards) - 1:  # shards that hold only empty tensors
            self._open_shard(self._current + 1)
        with self._disk():
            self.staging.mkdir(exist_ok=True)
            for shard, name in zip(self._files, self.names):
                shard.link(self.staging / name)
            if not self.single_file:
                self._write_sidecars()
        self._publish()

    def _publish(self) -> None:
        self._validate()
        check_not_input(self.out)  # an input opened after the writer was made (inputs noted by the readers)
        with self._disk():
            fsync_dir(self.staging)
            source = self.staging / self.names[0] if self.single_file else self.staging
            with signals_deferred():  # a signal between the swap and the cleanup waits for both
                publish(source, self.target)
                if self.single_file:
                    shutil.rmtree(self.staging, ignore_errors=True)
        self._done = True

    def _write_sidecars(self) -> None:
        for src in self.extra_files:
            shutil.copyfile(src, self.staging / src.name)
        for fname, text in self.extra_texts.items():
            (self.staging / fname).write_text(text, "utf-8")
        index = self.layout.index_text()
        if index is not None:
            (self.staging / self.layout.index_name).write_text(index, "utf-8")
        mode = 0o666 & ~current_umask()
        for p in self.staging.iterdir():
            os.chmod(p, mode)
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())

    def _validate(self) -> None:
        """Re-read every written header and compare with the plan and the index."""
        target = self.staging / self.names[0] if self.single_file else self.staging
        with Checkpoint.open(target) as written:
            if sorted(written.keys()) != sorted(s.name for s in self.specs):
                raise CheckpointFormatError(f"{show(self.out)}: written shards do not hold the planned tensors; "
                                            "nothing was published.")
            for spec in self.specs:
                info = written.info(spec.name)
                if info.dtype != spec.dtype or info.shape != spec.shape:
                    raise CheckpointFormatError(f"{show(self.out)}: written tensor {spec.name!r} does not match the plan.")

    def _unlock(self) -> None:
        if self._locked:
            self._locked = False
            release_lock(self.target)

    def abort(self) -> None:
        for shard in self._files:
            shard.discard()
        shutil.rmtree(self.staging, ignore_errors=True)
        remove_empty(self._created)
        self._unlock()

    def __enter__(self) -> CheckpointWriter:
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(signals_as_interrupts())
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                try:
                    self._finish()
                except BaseException:
                    self.abort()
                    raise
                self._unlock()
            else:
                self.abort()
        finally:
            if self._signals is not None:
                self._signals.close()

    @property
    def shard_files(self) -> list[str]:
        return list(self.names)


def _missing_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return missing
