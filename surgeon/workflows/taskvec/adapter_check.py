"""`surgeon diff --adapter`: does τ = θ_tuned − θ_base equal the adapter's ΔW?

The adapter's effective ΔW per target tensor is ``merged_float32(base, plan, name) −
θ_base`` from the merge workflow, i.e. exactly what ``surgeon merge`` would add in
float32 (LoRA scaling, rank/alpha patterns, DoRA, modules_to_save, ...).

Per target: cosine(τ, ΔW), max |τ − ΔW|, relative error ‖τ − ΔW‖_F / ‖ΔW‖_F and,
when that exceeds the tolerance, ``max_ulps`` = max |τ − ΔW| / ulp_d(max(|θ_base|, |ΔW|))
with d the tuned tensor's stored dtype. A target is equivalent when the relative error is within ``tolerance``
or when ``max_ulps`` ≤ 2: the most a merge carried out in d can be off, rounding W,
ΔW and W + ΔW once each (½ + ½ + 1 ulp at that scale, since |W + ΔW| ≤ 2·max).
That is how an fp16/bf16-merged model passes against the exact float32 merge. The
adapter is equivalent when every target is and no tensor outside the targets changed.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from surgeon.io.adapter import Adapter
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.finite_inputs import refuse_non_finite_adapter
from surgeon.io.format import torch_dtype
from surgeon.io.resolve import resolve_path
from surgeon.ops.task_vector import CHANGED, abs_max, is_float_dtype, rounding_check

if TYPE_CHECKING:
    from surgeon.workflows.taskvec.results import TensorDiff


@dataclass(frozen=True)
class TargetCheck:
    """τ against the adapter's ΔW on one target tensor (``status``: τ's class, or
    ``missing`` when the tuned model lacks the tensor or has another shape)."""

    name: str
    status: str
    cosine: float
    max_abs_diff: float
    relative_error: float
    max_ulps: float | None  # None when relative_error ≤ tolerance already decided
    delta_norm: float
    equivalent: bool


@dataclass(frozen=True)
class ParamCount:
    tensors: int
    parameters: int
    names: list[str]


@dataclass(frozen=True)
class AdapterCheck:
    adapter: str
    tolerance: float
    equivalent: bool
    targets: list[TargetCheck]
    shared: ParamCount  # changed in τ and targeted by the adapter
    task_vector_only: ParamCount  # changed in τ, not touched by the adapter
    adapter_only: ParamCount  # touched by the adapter, not changed in τ
    max_abs_diff: float
    max_relative_error: float
    min_cosine: float

    def to_dict(self) -> dict[str, Any]:
        return finite_or_none(asdict(self))


def finite_or_none(value: Any) -> Any:
    """The same structure with inf/NaN floats replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return value


@torch.no_grad()
def compare_delta(
    name: str, status: str, delta: torch.Tensor, adapter_delta: torch.Tensor, base: torch.Tensor,
    stored: torch.dtype, tolerance: float,
) -> TargetCheck:
    """Compare τ with ΔW (same shape as ``base``, float32); ``stored``: the tuned tensor's dtype.

    The cosine comes from three float32 norms, cos = (‖τ‖² + ‖ΔW‖² − ‖τ − ΔW‖²) / (2‖τ‖‖ΔW‖),
    which stays accurate when τ ≈ ΔW (no float64 copies of the tensors).
    """
    residual = delta - adapter_delta
    d_norm = float(torch.linalg.vector_norm(adapter_delta))
    t_norm = float(torch.linalg.vector_norm(delta))
    r_norm = float(torch.linalg.vector_norm(residual))
    if d_norm > 0 and t_norm > 0:
        one_minus = (r_norm**2 - (t_norm - d_norm) ** 2) / (2 * t_norm * d_norm)
        cosine = max(-1.0, min(1.0, 1.0 - one_minus))
    else:
        cosine = 1.0 if d_norm == t_norm else 0.0
    relative = r_norm / d_norm if d_norm > 0 else (0.0 if r_norm == 0 else float("inf"))
    max_abs = abs_max(residual)
    ulps: float | None = None  # only needed when the relative error alone does not decide
    if relative > tolerance:
        if is_float_dtype(stored):
            ulps = rounding_check(residual, torch.maximum(base.abs(), adapter_delta.abs()), stored).max_ulps
        else:
            ulps = float("inf")
    equivalent = relative <= tolerance or (ulps is not None and ulps <= 2.0)
    return TargetCheck(name, status, cosine, max_abs, relative, ulps, d_norm, equivalent)


class AdapterChecker:
    """Collects per-target checks while the diff streams; ``finish`` adds the counts."""

    def __init__(self, adapter: str | os.PathLike[str], base: Checkpoint, *, tolerance: float, device: str) -> None:
        from surgeon.workflows.merge.run import merged_float32, plan_adapter_merge

        self.name = str(adapter)
        self.adapter = Adapter.open(resolve_path(adapter))
        refuse_non_finite_adapter(self.adapter.weights)  # one line naming the factor, not "max error inf"
        self.base = base
        self.tolerance = tolerance
        self.device = device
        self._merged = merged_float32
        self.plan = plan_adapter_merge(base, [(self.adapter, 1.0)])
        self.targets = list(self.plan.targets)
        self.results: dict[str, TargetCheck] = {}

    def check(self, name: str, delta: torch.Tensor, tuned_dtype: str) -> None:
        """Compare τ of ``name`` (float32) with the adapter's ΔW, if ``name`` is a target."""
        if name not in self.plan.targets:
            return
        base = self.base.get(name, dtype=torch.float32)
        merged = self._merged(self.base, self.plan, name, device=self.device).to("cpu", torch.float32)
        adapter_delta = merged - base
        self.results[name] = compare_delta(name, "", delta, adapter_delta, base,
                                           torch_dtype(tuned_dtype), self.tolerance)

    def finish(self, diffs: list[TensorDiff]) -> AdapterCheck:
        by_name = {d.name: d for d in diffs}
        checks = []
        for name in self.targets:
            if name in self.results:
                checks.append(replace(self.results[name], status=by_name[name].status))
            else:  # the tuned model lacks this tensor or has it in another shape
                checks.append(TargetCheck(name, "missing", 0.0, float("inf"), float("inf"), float("inf"), 0.0, False))
        targets = set(self.targets)
        changed = [d for d in diffs if d.status == CHANGED]
        shared = [d for d in changed if d.name in targets]
        tv_only = [d for d in changed if d.name not in targets]
        adapter_only = [n for n in self.targets if by_name.get(n) is None or by_name[n].status != CHANGED]
        sizes = {n: self.base.info(n).numel for n in self.targets}
        finite = [c for c in checks if c.status != "missing"]
        return AdapterCheck(
            adapter=self.name, tolerance=self.tolerance,
            equivalent=all(c.equivalent for c in checks) and not tv_only,
            targets=checks,
            shared=_count([d.name for d in shared], {d.name: d.parameters for d in shared}),
            task_vector_only=_count([d.name for d in tv_only], {d.name: d.parameters for d in tv_only}),
            adapter_only=_count(adapter_only, sizes),
            max_abs_diff=max((c.max_abs_diff for c in checks), default=0.0),
            max_relative_error=max((c.relative_error for c in checks), default=0.0),
            min_cosine=min((c.cosine for c in finite), default=1.0),
        )

    def close(self) -> None:
        self.adapter.close()

    def __enter__(self) -> AdapterChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _count(names: list[str], sizes: dict[str, int]) -> ParamCount:
    return ParamCount(len(names), sum(sizes[n] for n in names), names)
