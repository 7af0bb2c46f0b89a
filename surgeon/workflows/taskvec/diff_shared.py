"""`surgeon diff` on a process group: each rank measures its share of the tensors (rank statistics
by SVD cost, the rest by size) and checks them against the adapter; every rank gets the whole list
in order. Rank 0 alone writes τ (a second streamed pass, I/O-bound)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from surgeon.io.checkpoint import Checkpoint
from surgeon.ops.task_vector import RankStats
from surgeon.parallel.exchange import collect, plan_share, run_share
from surgeon.parallel.share import svd_cost
from surgeon.parallel.world import World
from surgeon.workflows.taskvec.adapter_check import AdapterChecker, TargetCheck
from surgeon.workflows.taskvec.results import TensorDiff


def measure_shared(world: World, tuned: Checkpoint, base: Checkpoint, names: Sequence[str], opts: Any,
                   checker: AdapterChecker | None, *, measure_tensor: Callable[..., Any]) -> tuple[list[TensorDiff], list[int]]:
    """The diffs of ``names`` in order and the rank that measured each (``measure_tensor``: diff's own);
    ``checker.results`` filled with every target's check."""
    def cost(name: str) -> float:
        shape = tuned.info(name).shape
        return svd_cost(*shape) if opts.ranks and len(shape) == 2 else float(tuned.info(name).numel)

    def one(name: str) -> tuple[TensorDiff, TargetCheck | None]:
        diff, delta = measure_tensor(tuned, base, name, opts)
        if checker is None:
            return diff, None
        checker.check(name, delta, tuned.info(name).dtype)
        return diff, checker.results.pop(name, None)

    part = plan_share(world, [cost(n) for n in names])
    mine = [names[i] for i in part.mine]
    run_share(part, mine, (one(n) for n in mine))
    gathered = collect(part, encode=_encode, decode=_decode)
    if checker is not None:
        checker.results.update({c.name: c for _, c in gathered if c is not None})
    return [d for d, _ in gathered], part.owners


def _encode(result: tuple[TensorDiff, TargetCheck | None]) -> dict[str, Any]:
    diff, check = result
    return {"diff": asdict(diff), "check": None if check is None else asdict(check)}


def _decode(data: dict[str, Any]) -> tuple[TensorDiff, TargetCheck | None]:
    diff = dict(data["diff"])
    if diff.get("rank") is not None:
        diff["rank"] = RankStats(**diff["rank"])
    check = data["check"]
    return TensorDiff(**diff), None if check is None else TargetCheck(**check)
