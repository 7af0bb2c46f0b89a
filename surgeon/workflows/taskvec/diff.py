"""`surgeon diff`: the task vector τ = θ_tuned − θ_base, classified and measured per tensor.

Streaming, in two passes when writing only the changed tensors: pass 1 reads each
pair of tensors, computes τ in float32, classifies it (identical / rounding only /
changed, see :mod:`surgeon.ops.task_vector`) and measures it; pass 2 recomputes τ for
the tensors to write (the header of the output must be known before its data). With
``all_tensors`` the set is known up front and one pass does both.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgeon.errors import OptionError, ShapeMismatchError
from surgeon.io.checkpoint import Checkpoint
from surgeon.workflows.device import pick_device  # noqa: F401 - re-exported for callers
from surgeon.io.format import DTYPE_ALIASES, torch_dtype
from surgeon.io.output import refuse_non_finite
from surgeon.io.resolve import resolve_path
from surgeon.io.roles import refuse_adapter
from surgeon.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec, check_output
from surgeon.ops.task_vector import (
    CHANGED, IDENTICAL, ROUNDING_ONLY, DeltaMeasure, RankStats, is_float_dtype, measure_delta, rank_stats, task_vector,
)
from surgeon.ops.threads import one_cpu_thread
from surgeon.parallel.exchange import device_for
from surgeon.parallel.world import SOLO, World
from surgeon.progress import progress
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text, safetensors_metadata
from surgeon.workflows.taskvec.diff_shared import measure_shared
from surgeon.workflows.taskvec.adapter_check import AdapterCheck, AdapterChecker, finite_or_none
from surgeon.workflows.taskvec.results import ClassCount, DiffSummary, ShapeMismatch, TensorDiff

TASK_VECTOR_KIND = "task_vector"


@dataclass(frozen=True)
class DiffReport:
    tuned: str
    base: str
    output: str | None
    rounding_dtype: str  # "auto" (each tuned tensor's stored dtype) or F16/BF16/F32
    summary: DiffSummary
    tensors: list[TensorDiff]
    written: list[str] = field(default_factory=list)
    adapter_check: AdapterCheck | None = None
    world_size: int = 1
    computed_by_rank: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        body = finite_or_none(asdict(self))
        owners = body.pop("computed_by_rank") or [0] * len(self.tensors)
        body["tensors"] = [{**t, "computed_by_rank": r} for t, r in zip(body["tensors"], owners)]
        return body


@dataclass(frozen=True)
class TensorPairs:
    """How the keys of two checkpoints line up (in the first one's order)."""

    common: list[str]
    only_in_first: list[str]
    only_in_second: list[str]
    shape_mismatches: list[ShapeMismatch]


def pair_tensors(first: Checkpoint, second: Checkpoint) -> TensorPairs:
    common, mismatches = [], []
    for name in first.keys():
        if name not in second:
            continue
        a, b = first.info(name).shape, second.info(name).shape
        if a == b:
            common.append(name)
        else:
            mismatches.append(ShapeMismatch(name, list(a), list(b)))
    return TensorPairs(
        common=common,
        only_in_first=[n for n in first.keys() if n not in second],
        only_in_second=[n for n in second.keys() if n not in first],
        shape_mismatches=mismatches,
    )


def refuse_mismatch(pairs: TensorPairs, first: str, second: str) -> None:
    """Raise when keys or shapes do not line up (``--strict``)."""
    problems = len(pairs.only_in_first) + len(pairs.only_in_second) + len(pairs.shape_mismatches)
    if not problems:
        return
    if pairs.shape_mismatches:
        m = pairs.shape_mismatches[0]
        example = f"{m.name!r} is {m.tuned_shape} in {first} but {m.base_shape} in {second}"
    elif pairs.only_in_first:
        example = f"{pairs.only_in_first[0]!r} is only in {first}"
    else:
        example = f"{pairs.only_in_second[0]!r} is only in {second}"
    raise ShapeMismatchError(
        f"{first} and {second}: {problems} tensor(s) differ in name or shape (e.g. {example}); "
        "compare checkpoints of the same architecture, or drop --strict to list them and go on."
    )


def parse_rounding_dtype(name: str | None) -> str | None:
    """'auto'/None -> None (each tuned tensor's stored dtype); 'fp16' -> 'F16', ..."""
    if name is None or name.lower() == "auto":
        return None
    key = DTYPE_ALIASES.get(name.lower(), name.upper())
    if key not in ("F16", "BF16", "F32"):
        raise OptionError(f"--rounding-dtype {name!r} is not a float dtype; use auto, fp16, bf16 or fp32.")
    return key


@dataclass(frozen=True)
class _Options:
    rounding_dtype: str | None
    ranks: bool
    device: str
    exact_ranks: bool = False


def load_pair(tuned: Checkpoint, base: Checkpoint, name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(tuned, base) as stored, and whether their bytes are equal (same dtype only: a memcmp)."""
    t_info, b_info = tuned.info(name), base.info(name)
    t_raw, b_raw = tuned.read_raw(name), base.read_raw(name)
    same = t_info.dtype == b_info.dtype and t_raw == b_raw
    tensors = []
    for raw, info in ((t_raw, t_info), (b_raw, b_info)):
        t = torch.frombuffer(raw, dtype=info.torch_dtype) if info.numel else torch.empty(0, dtype=info.torch_dtype)
        refuse_non_finite(t, where=info.file, name=name, role="holds",
                          fix="a task vector of it means nothing; re-download or re-create this checkpoint")
        tensors.append(t.reshape(info.shape))
    return tensors[0], tensors[1], same


def measure_tensor(tuned: Checkpoint, base: Checkpoint, name: str, opts: _Options) -> tuple[TensorDiff, torch.Tensor]:
    """(measurements, τ float32) for one tensor present in both with the same shape."""
    t_info, b_info = tuned.info(name), base.info(name)
    t, b, same_bytes = load_pair(tuned, base, name)
    rounding = opts.rounding_dtype or t_info.dtype
    floats = is_float_dtype(t.dtype) and is_float_dtype(b.dtype)
    if same_bytes:  # identical without arithmetic
        delta = torch.zeros(t.shape, dtype=torch.float32)
        base_norm = float(torch.linalg.vector_norm(b.to(torch.float32))) if floats and b.numel() else 0.0
        m = DeltaMeasure(IDENTICAL, 0.0, base_norm, 0.0, 0.0, 0)
    else:
        delta, m = measure_delta(t, b, torch_dtype(rounding) if floats else None)
    rank = None
    if opts.ranks and m.status == CHANGED and delta.ndim == 2 and min(delta.shape) > 0:
        with one_cpu_thread(opts.device):  # skinny products: a second thread waits more than it gains
            rank = rank_stats(delta, device=opts.device, exact=opts.exact_ranks)
    diff = TensorDiff(
        name=name, status=m.status, dtype=t_info.dtype, base_dtype=b_info.dtype, rounding_dtype=rounding,
        shape=list(t_info.shape), parameters=t_info.numel, norm=m.norm, base_norm=m.base_norm,
        relative_norm=m.relative, max_abs=m.max_abs, max_ulps=m.max_ulps, beyond_rounding=m.beyond, rank=rank,
    )
    return diff, delta


def summarize(pairs: TensorPairs, diffs: list[TensorDiff], non_float: list[str]) -> DiffSummary:
    counts = {s: [0, 0] for s in (IDENTICAL, ROUNDING_ONLY, CHANGED)}
    for d in diffs:
        counts[d.status][0] += 1
        counts[d.status][1] += d.parameters
    return DiffSummary(
        identical=ClassCount(*counts[IDENTICAL]), rounding_only=ClassCount(*counts[ROUNDING_ONLY]),
        changed=ClassCount(*counts[CHANGED]), norm=sum(d.norm**2 for d in diffs) ** 0.5,
        only_in_tuned=pairs.only_in_first, only_in_base=pairs.only_in_second,
        shape_mismatches=pairs.shape_mismatches, non_float=non_float,
    )


def diff_checkpoints(
    tuned: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    all_tensors: bool = False,
    strict: bool = False,
    ranks: bool = True,
    exact_ranks: bool = False,
    rounding_dtype: str | None = None,
    adapter: str | os.PathLike[str] | None = None,
    tolerance: float = 1e-4,
    device: str | None = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    world: World = SOLO,
) -> DiffReport:
    """Diff ``tuned`` against ``base``; write τ (float32) to ``out`` when given.

    Only ``changed`` tensors are written unless ``all_tensors``. With ``adapter``,
    also check that τ equals the adapter's ΔW on every target (see
    :mod:`surgeon.workflows.taskvec.adapter_check`).
    """
    if not (tolerance >= 0 and tolerance != float("inf")):  # NaN fails >= too
        raise OptionError(f"--tolerance {tolerance}: give a finite relative error of 0 or more, e.g. --tolerance 1e-4.")
    opts = _Options(parse_rounding_dtype(rounding_dtype), ranks, pick_device(device_for(world, device or "auto")),
                    exact_ranks)
    tuned_path, base_path = resolve_path(tuned), resolve_path(base)
    for path in (tuned_path, base_path):
        refuse_adapter(path, expected="a model", fix="diff compares two models: check an adapter against its merge "
                       "with `surgeon diff MERGED BASE --adapter ADAPTER`, or merge it first with `surgeon merge`")
    with ExitStack() as stack:
        t_ckpt = stack.enter_context(Checkpoint.open(tuned_path))
        b_ckpt = stack.enter_context(Checkpoint.open(base_path))
        pairs = pair_tensors(t_ckpt, b_ckpt)
        if strict:
            refuse_mismatch(pairs, str(tuned), str(base))
        checker = None
        if adapter is not None:
            checker = stack.enter_context(AdapterChecker(adapter, b_ckpt, tolerance=tolerance, device=opts.device))
        if out is not None and world.is_main:  # refuse a bad output before the long analysis pass, not after it
            check_output(Path(out), [tuned_path, base_path], overwrite=overwrite)
        floats = [n for n in pairs.common if _both_float(t_ckpt, b_ckpt, n)]
        float_set = set(floats)
        non_float = [n for n in pairs.common if n not in float_set]
        record = provenance("diff", {"all": all_tensors, "rounding_dtype": opts.rounding_dtype or "auto",
                                     "strict": strict}, inputs={"tuned": str(tuned), "base": str(base)})
        if world.distributed:
            diffs, owners = measure_shared(world, t_ckpt, b_ckpt, pairs.common, opts, checker,
                                           measure_tensor=measure_tensor)
            written = []
            if out is not None:
                chosen = floats if all_tensors else [d.name for d in diffs if d.status == CHANGED and d.name in float_set]
                written = chosen
                if world.is_main:
                    _write_pass(t_ckpt, b_ckpt, chosen, out, record, _summary_dict(pairs, diffs, non_float),
                                max_shard_size, overwrite, [tuned_path, base_path])
        elif out is not None and all_tensors:
            diffs, written = _one_pass(t_ckpt, b_ckpt, pairs.common, floats, out, record, opts, checker,
                                       max_shard_size, overwrite, [tuned_path, base_path])
        else:
            diffs = [d for d, _ in _measure_all(t_ckpt, b_ckpt, pairs.common, opts, checker)]
            written = []
            if out is not None:
                changed = [d.name for d in diffs if d.status == CHANGED and d.name in float_set]
                written = _write_pass(t_ckpt, b_ckpt, changed, out, record, _summary_dict(pairs, diffs, non_float),
                                      max_shard_size, overwrite, [tuned_path, base_path])
        check = checker.finish(diffs) if checker is not None else None
    return DiffReport(str(tuned), str(base), None if out is None else str(out), opts.rounding_dtype or "auto",
                      summarize(pairs, diffs, non_float), diffs, written, check, world.size,
                      owners if world.distributed else [])


def _both_float(a: Checkpoint, b: Checkpoint, name: str) -> bool:
    return is_float_dtype(a.info(name).torch_dtype) and is_float_dtype(b.info(name).torch_dtype)


def _measure_all(
    tuned: Checkpoint, base: Checkpoint, names: list[str], opts: _Options, checker: AdapterChecker | None
) -> Iterator[tuple[TensorDiff, torch.Tensor]]:
    for name in progress(names, total=len(names), desc="diff"):
        diff, delta = measure_tensor(tuned, base, name, opts)
        if checker is not None:
            checker.check(name, delta, tuned.info(name).dtype)
        yield diff, delta


def _summary_dict(pairs: TensorPairs, diffs: list[TensorDiff], non_float: list[str]) -> dict[str, Any]:
    return {"summary": asdict(summarize(pairs, diffs, non_float)),
            "changed": [d.name for d in diffs if d.status == CHANGED]}


def _writer(out: str | os.PathLike[str], specs: list[TensorSpec], record: dict[str, Any], report: dict[str, Any] | None,
            max_shard_size: int | str, overwrite: bool, inputs: list[Path]) -> CheckpointWriter:
    metadata = {**safetensors_metadata(record), "surgeon_kind": TASK_VECTOR_KIND}
    return CheckpointWriter(out, specs, inputs=inputs, max_shard_size=max_shard_size, metadata=metadata,
                            extra_texts={PROVENANCE_FILE: provenance_file_text(record, report)},
                            overwrite=overwrite, prefix="task_vector")


def _write_pass(tuned: Checkpoint, base: Checkpoint, names: list[str], out: str | os.PathLike[str],
                record: dict[str, Any], report: dict[str, Any], max_shard_size: int | str, overwrite: bool,
                inputs: list[Path]) -> list[str]:
    specs = [TensorSpec(n, "F32", tuned.info(n).shape) for n in names]
    with _writer(out, specs, record, report, max_shard_size, overwrite, inputs) as writer:
        for name in progress(names, total=len(names), desc="write τ"):
            writer.write(name, task_vector(tuned.get(name), base.get(name)))
    return names


def _one_pass(tuned: Checkpoint, base: Checkpoint, common: list[str], floats: list[str], out: str | os.PathLike[str],
              record: dict[str, Any], opts: _Options, checker: AdapterChecker | None, max_shard_size: int | str,
              overwrite: bool, inputs: list[Path]) -> tuple[list[TensorDiff], list[str]]:
    specs = [TensorSpec(n, "F32", tuned.info(n).shape) for n in floats]
    write = set(floats)
    diffs = []
    with _writer(out, specs, record, None, max_shard_size, overwrite, inputs) as writer:
        for diff, delta in _measure_all(tuned, base, common, opts, checker):
            diffs.append(diff)
            if diff.name in write:
                writer.write(diff.name, delta)
        non_float = [n for n in common if n not in write]
        pairs = pair_tensors(tuned, base)
        writer.extra_texts[PROVENANCE_FILE] = provenance_file_text(record, _summary_dict(pairs, diffs, non_float))
    return diffs, floats
