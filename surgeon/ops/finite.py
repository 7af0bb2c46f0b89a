"""Counting values that are not finite (NaN, +Inf, -Inf) in a tensor."""

from __future__ import annotations

import torch

_CHUNK = 1 << 24  # elements per pass: the boolean scratch stays at 16 MB whatever the tensor's size


@torch.no_grad()
def non_finite_count(t: torch.Tensor) -> int:
    """How many elements of ``t`` (any shape; integer dtypes have none) are NaN or ±Inf."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    flat = t.reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK]
        if not bool(torch.isfinite(part).all()):
            bad += int((~torch.isfinite(part)).sum())
    return bad
