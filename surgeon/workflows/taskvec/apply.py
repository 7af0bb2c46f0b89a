"""`surgeon apply`: task arithmetic θ = θ_base + Σ λ_i·τ_i, streamed, one rounding.

Each output tensor touched by a task vector is computed in float32 from the
stored base values and the task vectors, then cast once to the base tensor's
dtype (or ``dtype``). Tensors no task vector touches (absent, all-zero τ, or
λ = 0) are copied byte for byte (cast only when ``dtype`` asks for it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import torch

from surgeon.errors import CheckpointFormatError, OptionError, ShapeMismatchError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import torch_dtype
from surgeon.io.model_config import side_files
from surgeon.io.resolve import resolve_path
from surgeon.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec
from surgeon.ops.task_vector import abs_max, is_float_dtype
from surgeon.progress import progress
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text, safetensors_metadata
from surgeon.workflows.convert import parse_dtype

TaskArg = Union[str, "os.PathLike[str]", tuple[Union[str, "os.PathLike[str]"], float]]


@dataclass(frozen=True)
class TaskTerm:
    """One λ·τ term: where τ came from and how many base tensors it touches."""

    path: str
    weight: float
    tensors: int


@dataclass(frozen=True)
class ApplyReport:
    base: str
    output: str
    dtype: str  # "auto" (each base tensor's dtype) or F16/BF16/F32
    tasks: list[TaskTerm]
    tensors: int
    computed: int
    copied: int
    cast: int
    bytes_written: int
    shards: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_task(arg: TaskArg) -> tuple[str, float]:
    """'tau:0.5' -> ('tau', 0.5); 'tau' -> ('tau', 1.0); ('tau', 0.5) passes through.

    The text after the last ':' is λ when it parses as a number (negative allowed).
    """
    if isinstance(arg, tuple):
        path, weight = arg
        return str(path), float(weight)
    text = os.fspath(arg)
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(weight):
            raise OptionError(f"{text}: λ must be a finite number, got {tail!r}; write TV:0.5 or TV:-1.")
        return head, weight
    return text, 1.0


def _check_tasks(base: Checkpoint, tasks: list[tuple[str, Checkpoint, float]]) -> None:
    """Every τ tensor must exist in the base as a float tensor of the same shape."""
    for arg, tv, _ in tasks:
        for name in tv.keys():
            if name not in base:
                raise ShapeMismatchError(
                    f"{arg}: task vector tensor {name!r} is not in the base {base.root}; "
                    "apply a task vector to the base it was diffed against."
                )
            t_info, b_info = tv.info(name), base.info(name)
            if t_info.shape != b_info.shape:
                raise ShapeMismatchError(
                    f"{arg}: tensor {name!r} is {list(t_info.shape)} in the task vector but {list(b_info.shape)} "
                    f"in the base {base.root}; apply it to the base it was diffed against."
                )
            if not (is_float_dtype(t_info.torch_dtype) and is_float_dtype(b_info.torch_dtype)):
                raise CheckpointFormatError(
                    f"{arg}: tensor {name!r} is {t_info.dtype} in the task vector and {b_info.dtype} in the base; "
                    "task arithmetic needs float tensors on both sides. Remove it from the task vector."
                )


@torch.no_grad()
def combine(base: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """θ_base + Σ λ_i·τ_i in float32 (``base`` and every τ_i of one shape, any float dtype)."""
    out = base.to(torch.float32, copy=True)
    for weight, delta in terms:
        out.add_(delta.to(torch.float32), alpha=weight)
    return out


def apply_task_vectors(
    base: str | os.PathLike[str],
    tasks: Sequence[TaskArg],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> ApplyReport:
    """Write θ_base + Σ λ_i·τ_i to ``out``; ``tasks`` are 'TV[:λ]' strings or (path, λ) pairs.

    Terms with λ = 0 are dropped, so applying only zero weights copies the base byte for byte.
    """
    if not tasks:
        raise OptionError("no task vectors given; pass at least one TV[:λ] (e.g. ./tau:0.5).")
    target = parse_dtype(dtype)
    parsed = [parse_task(t) for t in tasks]
    base_path = resolve_path(base)
    with ExitStack() as stack:
        b_ckpt = stack.enter_context(Checkpoint.open(base_path))
        opened = [(arg, stack.enter_context(Checkpoint.open(resolve_path(arg))), w) for arg, w in parsed]
        _check_tasks(b_ckpt, opened)
        active = [(arg, tv, w) for arg, tv, w in opened if w != 0.0]
        plan = _plan(b_ckpt, active, target)
        specs = [TensorSpec(name, st, b_ckpt.info(name).shape) for name, st, _ in plan]
        record = provenance("apply", {"tasks": [{"path": a, "lambda": w} for a, w in parsed], "dtype": target or "auto"},
                            inputs={"base": str(base), **{f"task_vector_{i}": a for i, (a, _) in enumerate(parsed)}})
        inputs = [base_path] + [resolve_path(a) for a, _ in parsed]
        copy, texts = side_files(b_ckpt, target)  # config.json names the dtype the weights were cast to
        with CheckpointWriter(out, specs, inputs=inputs, max_shard_size=max_shard_size, overwrite=overwrite,
                              metadata=safetensors_metadata(record), extra_files=copy,
                              extra_texts={**texts, PROVENANCE_FILE: provenance_file_text(record)}) as writer:
            computed_names = {name for name, st, terms in progress(plan, total=len(plan), desc="apply")
                              if _write_one(writer, b_ckpt, name, st, terms)}
        computed = len(computed_names)
        cast = sum(1 for name, st, _ in plan if name not in computed_names and st != b_ckpt.info(name).dtype)
        return ApplyReport(
            base=str(base), output=str(out), dtype=target or "auto",
            tasks=[TaskTerm(a, w, len(tv.keys()) if w != 0.0 else 0) for a, tv, w in opened],
            tensors=len(plan), computed=computed, copied=len(plan) - computed - cast, cast=cast,
            bytes_written=sum(s.nbytes for s in specs), shards=writer.shard_files,
        )


_Plan = list[tuple[str, str, list[tuple[float, Checkpoint]]]]


def _plan(base: Checkpoint, active: list[tuple[str, Checkpoint, float]], target: str | None) -> _Plan:
    """(name, output dtype, [(λ, τ checkpoint)...]) for every base tensor, in base order."""
    plan: _Plan = []
    for name, info in base.tensors.items():
        terms = [(w, tv) for _, tv, w in active if name in tv]
        st = target if (target and is_float_dtype(info.torch_dtype)) else info.dtype
        plan.append((name, st, terms))
    return plan


def _write_one(writer: CheckpointWriter, base: Checkpoint, name: str, st: str,
               terms: list[tuple[float, Checkpoint]]) -> bool:
    """Write one output tensor; True when it was computed, False when copied or only cast.

    A τ that is all zeros (``diff --all`` writes those for identical tensors) is no term,
    so such a tensor stays byte-identical to the base.
    """
    loaded = [(w, d) for w, d in ((w, tv.get(name)) for w, tv in terms) if abs_max(d) != 0.0]
    if loaded:
        writer.write(name, combine(base.get(name), loaded).to(torch_dtype(st)))
    elif st == base.info(name).dtype:
        writer.copy_from(base, name)
    else:
        writer.write(name, base.get(name).to(torch_dtype(st)))
    return bool(loaded)


def describe_tasks(report: ApplyReport) -> str:
    """'+1·tau_a −0.5·tau_b' for messages."""
    return " ".join(f"{'+' if t.weight >= 0 else '−'}{abs(t.weight):g}·{Path(t.path).name}" for t in report.tasks)
