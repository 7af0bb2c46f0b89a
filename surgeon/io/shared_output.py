"""One output written by many processes: shard files at known paths, every tensor's place known up front.

Rank 0 opens the :class:`~surgeon.io.writer.CheckpointWriter` as usual (lock, checks, free space)
and calls :meth:`~surgeon.io.writer.CheckpointWriter.share`: every shard becomes a named file in
the hidden staging folder, its header written and its length set. Every rank then computes the
same layout from the same specs (:func:`surgeon.io.layout.plan_layout` is pure) and opens those
files with :class:`RankShards` to ``pwrite`` its own tensors into their places. Rank 0 alone
verifies, fsyncs and publishes; the staging folder is removed if anything fails.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from surgeon.errors import CheckpointFormatError, OutputError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.layout import Place, ShardLayout, places
from surgeon.io.writer import copy_span, pwrite_all, tensor_bytes

if TYPE_CHECKING:
    import torch


def describe(layout: ShardLayout, folder: Path) -> dict[str, object]:
    """What the other ranks need to write into a shared output, as JSON-able data."""
    return {"folder": str(folder), "names": list(layout.names),
            "places": {k: [p.shard, p.offset, p.nbytes] for k, p in places(layout).items()}}


class RankShards:
    """This rank's handles on the shared shard files: ``place(name)`` gives ``(fd, offset)`` to ``pwrite``."""

    def __init__(self, shared: dict[str, object]) -> None:
        folder = Path(str(shared["folder"]))
        self.folder = folder
        self._places = {k: Place(*v) for k, v in shared["places"].items()}  # type: ignore[union-attr]
        self._fds: list[int] = []
        try:
            for name in shared["names"]:  # type: ignore[union-attr]
                self._fds.append(os.open(folder / name, os.O_WRONLY))
        except OSError as exc:
            self.close()
            raise OutputError(f"{folder}: cannot open the shared shard files ({exc.strerror or exc}); every rank "
                              "must see the output's folder at the same path (a shared filesystem).") from None

    def place(self, name: str) -> tuple[int, int]:
        spot = self._places.get(name)
        if spot is None:
            raise CheckpointFormatError(f"{self.folder}: tensor {name!r} was not planned for writing.")
        return self._fds[spot.shard], spot.offset

    def nbytes(self, name: str) -> int:
        return self._places[name].nbytes

    # the positional part of CheckpointWriter's interface, so a workflow's per-tensor writer runs unchanged
    def reserve(self, name: str) -> tuple[int, int]:
        return self.place(name)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        fd, offset = self._spot(name, tensor.numel() * tensor.element_size())
        pwrite_all(fd, tensor_bytes(tensor), offset)

    def copy_from(self, source: Checkpoint, name: str, as_name: str | None = None) -> None:
        fd, offset = self._spot(as_name or name, source.info(name).nbytes)
        copy_span(source, name, fd, offset)

    def _spot(self, name: str, nbytes: int) -> tuple[int, int]:
        fd, offset = self.place(name)
        if nbytes != self._places[name].nbytes:
            raise CheckpointFormatError(f"{self.folder}: tensor {name!r} needs {self._places[name].nbytes} bytes, "
                                        f"got {nbytes}.")
        return fd, offset

    def sync(self) -> None:
        """Make this rank's writes durable (on another node rank 0's fsync would not cover them)."""
        for fd in self._fds:
            os.fsync(fd)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> RankShards:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
