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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from surgeon.errors import CheckpointFormatError, OutputError
from surgeon.io.layout import ShardLayout


@dataclass(frozen=True)
class Place:
    """Where a tensor's bytes go: shard ``shard`` at absolute file offset ``offset``, ``nbytes`` long."""

    shard: int
    offset: int
    nbytes: int


def places(layout: ShardLayout) -> dict[str, Place]:
    """Every planned tensor's place (data follow each shard's header, in the shard's order)."""
    out: dict[str, Place] = {}
    for idx, (shard, header) in enumerate(zip(layout.shards, layout.headers)):
        offset = len(header)
        for spec in shard:
            out[spec.name] = Place(idx, offset, spec.nbytes)
            offset += spec.nbytes
    return out


def shard_lengths(layout: ShardLayout) -> list[int]:
    return [len(h) + sum(s.nbytes for s in shard) for shard, h in zip(layout.shards, layout.headers)]


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
