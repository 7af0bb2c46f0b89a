"""One checkpoint written by every rank of a process group, published once by rank 0.

Rank 0 opens the writer (lock, checks, free space, staging) and makes its shards shared files
(:meth:`CheckpointWriter.share`); the ranks learn where every tensor goes, write their own
tensors there with positional writes, fsync, and report. Rank 0 then finishes (provenance,
validation, fsync, publish) or, if any rank failed, removes the staging folder; every rank
ends with the same outcome.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from surgeon.errors import DistributedError, SurgeonError
from surgeon.io.shared_output import RankShards, describe
from surgeon.io.writer import CheckpointWriter
from surgeon.parallel.exchange import Share, all_gather_bytes, collect
from surgeon.parallel.world import World

R = TypeVar("R")


def _from_main(world: World, payload: dict[str, Any] | None) -> dict[str, Any]:
    blobs = all_gather_bytes(world, json.dumps(payload or {}).encode("utf-8"))
    return json.loads(blobs[0])


def write_shared(
    world: World,
    part: Share,
    *,
    open_writer: Callable[[], CheckpointWriter],
    fill: Callable[[RankShards], None],
    finish: Callable[[CheckpointWriter, list[Any]], None],
    encode: Callable[[Any], Any],
    decode: Callable[[Any], Any],
) -> list[Any]:
    """Run ``fill`` on every rank (it writes this rank's tensors through the handles and stores its
    results in ``part``), gather the results in plan order, let rank 0 ``finish`` the writer with
    them and publish. Returns the gathered results on every rank."""
    writer: CheckpointWriter | None = None
    opened: dict[str, Any] | None = None
    failure: BaseException | None = None
    if world.is_main:
        try:
            writer = open_writer()
            writer.__enter__()
            opened = describe(writer.layout, writer.share())
        except BaseException as exc:  # Ctrl-C or SIGTERM during share() too: its staging folder goes with it
            if writer is not None:
                writer.__exit__(type(exc), exc, exc.__traceback__)
                writer = None
            if not isinstance(exc, SurgeonError):
                raise
            failure, opened = exc, {"error": str(exc)}
    try:  # from here on, any exit of rank 0 (an error, Ctrl-C, SIGTERM from the launcher) closes the writer
        shared = _from_main(world, opened)
        if "error" in shared:
            if failure is not None:
                raise failure
            raise DistributedError(f"rank 0 could not open the output: {shared['error']}")
        try:  # a failure is held for the gather, so that no rank waits for a peer that gave up
            with RankShards(shared) as shards:
                fill(shards)
                shards.sync()
        except Exception as exc:
            part.fail(exc)
        results = collect(part, encode=encode, decode=decode)
        outcome: dict[str, Any] | None = None
        if writer is not None:
            try:
                finish(writer, results)
                writer, closing = None, writer
                closing.__exit__(None, None, None)  # publishes, or aborts and raises, by itself
                outcome = {"ok": True}
            except SurgeonError as exc:  # every rank learns it below, so that none waits for rank 0
                outcome, failure = {"error": str(exc)}, exc
                if writer is not None:
                    writer.__exit__(type(exc), exc, exc.__traceback__)
                    writer = None
    except BaseException as exc:
        if writer is not None:
            writer.__exit__(type(exc), exc, exc.__traceback__)
        raise
    final = _from_main(world, outcome)
    if "error" in final:
        if failure is not None:
            raise failure
        raise DistributedError(f"rank 0 could not publish the output: {final['error']}")
    return results


def owners_by_bytes(names: Sequence[str], nbytes: Callable[[str], int], size: int) -> dict[str, int]:
    """Who copies which untouched tensor: shared out by size (the work is reading and writing them)."""
    from surgeon.parallel.share import share

    return dict(zip(names, share([float(nbytes(n)) for n in names], size)))
