"""The per-tensor records a diff produces (shared by `diff` and `adapter_check`)."""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.ops.task_vector import RankStats


@dataclass(frozen=True)
class TensorDiff:
    """One tensor's τ. ``max_ulps``: max |τ| / ulp of ``rounding_dtype`` at |θ_base|;
    ``beyond_rounding``: elements with |τ| > ½ ulp (both None when max |τ| alone shows the
    tensor changed, and for non-float tensors); ``rank``: 2-D changed tensors only."""

    name: str
    status: str
    dtype: str
    base_dtype: str
    rounding_dtype: str
    shape: list[int]
    parameters: int
    norm: float
    base_norm: float
    relative_norm: float | None
    max_abs: float
    max_ulps: float | None
    beyond_rounding: int | None
    rank: RankStats | None = None


@dataclass(frozen=True)
class ClassCount:
    tensors: int = 0
    parameters: int = 0


@dataclass(frozen=True)
class ShapeMismatch:
    name: str
    tuned_shape: list[int]
    base_shape: list[int]


@dataclass(frozen=True)
class DiffSummary:
    """Counts per class, and what could not be compared (keys/shapes on one side only)."""

    identical: ClassCount
    rounding_only: ClassCount
    changed: ClassCount
    norm: float  # ‖τ‖ over all compared tensors
    only_in_tuned: list[str]
    only_in_base: list[str]
    shape_mismatches: list[ShapeMismatch]
    non_float: list[str]  # compared, never written to a task vector
