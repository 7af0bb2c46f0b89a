"""Results to every rank as JSON bytes in uint8 tensors (no pickle), failures reported by rank and item."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from surgeon.errors import DistributedError
from surgeon.parallel.share import share
from surgeon.parallel.world import PeerLostError, World


def all_gather_bytes(world: World, data: bytes) -> list[bytes]:
    """Every rank's ``data``, in rank order, on every rank."""
    if not world.distributed:
        return [data]
    import torch
    import torch.distributed as dist

    try:
        size = torch.tensor([len(data)], dtype=torch.int64, device=world.device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=world.device) for _ in range(world.size)]
        dist.all_gather(sizes, size)
        lengths = [int(s.item()) for s in sizes]
        buf = torch.zeros(max(lengths) or 1, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(world.device)
        out = [torch.zeros_like(buf) for _ in range(world.size)]
        dist.all_gather(out, buf)
    except Exception as exc:  # a peer died or timed out: gloo/nccl raise RuntimeError subclasses
        raise PeerLostError(f"rank {world.rank}: a collective with the other ranks failed ({_first_line(exc)}); "
                               "another rank probably died: see its message above.") from None
    return [bytes(t[:n].cpu().numpy().tobytes()) for t, n in zip(out, lengths)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@dataclass
class Share:
    """This rank's part of a planned list of items, and what it produced."""

    world: World
    owners: list[int]
    results: dict[int, Any] = field(default_factory=dict)
    failure: dict[str, Any] | None = None
    _current: str | None = None

    @property
    def mine(self) -> list[int]:
        return [i for i, owner in enumerate(self.owners) if owner == self.world.rank]

    @contextmanager
    def item(self, index: int, name: str) -> Iterator[None]:
        """Work on item ``index`` (``name`` for messages); a failure is held for :meth:`collect`."""
        self._current = name
        try:
            yield
        finally:
            self._current = None

    def fail(self, exc: BaseException) -> None:
        self.failure = {"rank": self.world.rank, "item": self._current, "message": _first_line(exc),
                        "type": type(exc).__name__}


def run_share(part: Share, names: Sequence[str], results: Iterable[Any]) -> None:
    """Store the results of this rank's items (``results`` yields them in the order of ``part.mine``).

    In a process group a failure is held (rank, item name, message) for :func:`collect` to report
    on every rank, instead of leaving the other ranks waiting at the gather; alone it propagates.
    """
    stream = iter(results)
    for index, name in zip(part.mine, names):
        with part.item(index, name):
            try:
                part.results[index] = next(stream)
            except Exception as exc:
                if not part.world.distributed:
                    raise
                part.fail(exc)
                return


def plan_share(world: World, costs: Sequence[float]) -> Share:
    """Owners of every item by cost (see :func:`surgeon.parallel.share.share`)."""
    return Share(world, share(costs, world.size))


def collect(part: Share, encode: Callable[[Any], Any], decode: Callable[[Any], Any]) -> list[Any]:
    """Every item's result in plan order, on every rank; raises DistributedError if any rank failed.

    ``encode`` turns one result into JSON-able data and ``decode`` back. A one-process run
    returns its results as they are (nothing is encoded).
    """
    if not part.world.distributed:
        return [part.results[i] for i in range(len(part.owners))]
    payload = {"failure": part.failure,
               "results": {} if part.failure else {str(i): encode(r) for i, r in part.results.items()}}
    started = time.monotonic()
    gathered = [json.loads(b) for b in all_gather_bytes(part.world, json.dumps(payload).encode("utf-8"))]
    failures = [g["failure"] for g in gathered if g["failure"]]
    if failures:
        f = failures[0]
        where = f" on {f['item']}" if f.get("item") else ""
        raise DistributedError(f"rank {f['rank']} failed{where}: {f['message']}")
    merged: dict[str, Any] = {}
    for g in gathered:
        merged.update(g["results"])
    missing = [i for i in range(len(part.owners)) if str(i) not in merged]
    if missing:
        raise DistributedError(f"{len(missing)} planned items came back from no rank (first: #{missing[0]}); "
                               f"the ranks disagree on the plan ({time.monotonic() - started:.1f} s at the gather).")
    return [decode(merged[str(i)]) for i in range(len(part.owners))]


def barrier(world: World) -> None:
    """Wait for every rank (a tiny all-gather, so the timeout and the failure message are ours)."""
    all_gather_bytes(world, b"")


def sum_counts(world: World, counts: dict[str, int]) -> dict[str, int]:
    """Integer counters summed over the ranks (cache hits, misses, ...), on every rank."""
    if not world.distributed:
        return dict(counts)
    total: dict[str, int] = {}
    for blob in all_gather_bytes(world, json.dumps(counts, sort_keys=True).encode("utf-8")):
        for key, value in json.loads(blob).items():
            total[key] = total.get(key, 0) + int(value)
    return {key: total[key] for key in counts} | {k: v for k, v in total.items() if k not in counts}


def device_for(world: World, device: str) -> str:
    """``--device auto`` on a rank of a GPU group is that rank's own GPU, not cuda:0."""
    return world.device if world.distributed and device == "auto" else device
