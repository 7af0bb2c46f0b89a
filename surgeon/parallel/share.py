"""Deterministic sharing of planned work by cost (pure: no process group needed)."""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def svd_cost(rows: int, cols: int) -> float:
    """Work of decomposing an m × n matrix, up to a constant: m·n·min(m, n)."""
    return float(rows) * float(cols) * float(min(rows, cols))


def share(costs: Sequence[float], size: int) -> list[int]:
    """The rank that does each item: longest first onto the least-loaded rank (ties: lower rank).

    The same costs give the same owners on every rank and every run; with one rank every item
    is rank 0's. LPT scheduling keeps the slowest rank within 4/3 of the best possible finish.
    """
    if size < 1:
        raise ValueError(f"world size {size}: need at least one rank")
    owners = [0] * len(costs)
    if size == 1:
        return owners
    loads = [(0.0, rank) for rank in range(size)]
    heapq.heapify(loads)
    for index in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + float(costs[index]), rank))
    return owners


def loads(costs: Sequence[float], owners: Sequence[int], size: int) -> list[float]:
    """Total cost per rank for an assignment (for reports and tests)."""
    out = [0.0] * size
    for cost, rank in zip(costs, owners):
        out[rank] += float(cost)
    return out
