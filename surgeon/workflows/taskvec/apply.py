"""`surgeon apply`: θ = θ_base + a combination of task vectors, streamed, one rounding.

An INPUT is a task vector written by ``surgeon diff -o`` or a fine-tune of BASE (τ = θ − θ_base is
then computed on the fly, block by block, and never written). The default method is task
arithmetic θ_base + Σ λ_i·τ_i; the others are mergekit's (ties, dare_*, breadcrumbs*, della*,
magnitude_prune, model_stock, slerp; :mod:`surgeon.workflows.taskvec.methods`).

The plan comes first: every base tensor, what happens to it (merge, copy or cast), which inputs
touch it and its output bytes; ``dry_run`` returns only that. Each merged tensor is computed in
float32 from the stored base values and the inputs, then cast once to the base tensor's dtype (or
``dtype``). Tensors no input touches (absent, all-zero τ, or λ = 0) are copied byte for byte
(cast only when ``dtype`` asks for it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from surgeon.errors import CheckpointFormatError, IncompatibleInputError, OptionError, ShapeMismatchError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import torch_dtype
from surgeon.io.model_config import side_files
from surgeon.io.resolve import resolve_path
from surgeon.io.roles import refuse_adapter
from surgeon.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec, pwrite_all, tensor_bytes
from surgeon.io.shared_output import RankShards
from surgeon.ops.task_vector import is_float_dtype
from surgeon.parallel.exchange import plan_share, run_share
from surgeon.parallel.world import SOLO, World
from surgeon.progress import progress
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text, safetensors_metadata
from surgeon.workflows.convert import parse_dtype
from surgeon.workflows.shared_write import write_shared
from surgeon.workflows.taskvec.diff import TASK_VECTOR_KIND
from surgeon.workflows.taskvec.methods import (BLOCK_ELEMENTS, ApplyOptions, ScratchPool, TensorMerge, Term, block_workers,
                                              check_options)

TaskArg = Union[str, "os.PathLike[str]", tuple[Union[str, "os.PathLike[str]"], float]]


@dataclass(frozen=True)
class TaskTerm:
    """One input: where it came from, its weight λ and how many base tensors it touches."""

    path: str
    weight: float
    tensors: int


@dataclass(frozen=True)
class PlannedTensor:
    """What happens to one base tensor: merge (from ``inputs``, indices into the report's tasks; copied
    after all when every τ is zero there), copy (byte for byte) or cast (to ``dtype``)."""

    name: str
    action: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int
    inputs: tuple[int, ...] = ()


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
    kinds: list[str] = field(default_factory=list)  # per input: task_vector | finetune
    method: str = "task_arithmetic"
    parameters: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False
    plan: list[PlannedTensor] = field(default_factory=list)

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


def input_kind(base: Checkpoint, ckpt: Checkpoint) -> str:
    """``task_vector`` for what ``surgeon diff`` wrote (or a bare file holding a subset of the base's tensors),
    ``finetune`` for a model: a folder with config.json, or a file with every tensor of the base."""
    if ckpt.metadata.get("surgeon_kind") == TASK_VECTOR_KIND:
        return "task_vector"
    if ckpt.is_folder and (ckpt.folder / "config.json").is_file():
        return "finetune"
    return "finetune" if set(base.keys()) <= set(ckpt.keys()) else "task_vector"


def _refuse_weights_as_task_vector(base: Checkpoint, arg: str, ckpt: Checkpoint, *, sample: int = 4) -> None:
    """A bare file taken as a task vector that holds model weights (one shard of a model, say) would add
    the weights to themselves; refuse it when its first matrices lie closer to the base's than to zero
    (a τ is a small change: ‖x − base‖ ≈ ‖base‖; weights: ‖x − base‖ ≪ ‖x‖)."""
    if ckpt.metadata.get("surgeon_kind") == TASK_VECTOR_KIND:
        return
    matrices = [n for n in ckpt.keys() if len(ckpt.info(n).shape) == 2 and is_float_dtype(ckpt.info(n).torch_dtype)]
    for name in matrices[:sample]:
        x = torch.from_numpy(ckpt.float32_array(name)).double()
        norm = float(torch.linalg.vector_norm(x))
        gap = float(torch.linalg.vector_norm(x - torch.from_numpy(base.float32_array(name)).double()))
        if norm > 0 and gap < 0.5 * norm:
            raise IncompatibleInputError(
                f"{arg}: looks like model weights, not a task vector: tensor {name!r} is closer to the base's than "
                f"to zero (||x - base|| / ||x|| = {gap / norm:.3g}), so adding it would double the weights. Give the "
                "whole fine-tuned model folder (apply computes tau = tuned - base), or make a task vector with "
                "`surgeon diff TUNED BASE -o TV`.")


def _check_input(base: Checkpoint, arg: str, ckpt: Checkpoint, kind: str) -> None:
    """Every input tensor must exist in the base as a float tensor of the same shape."""
    what = "task vector" if kind == "task_vector" else "fine-tune"
    for name in ckpt.keys():
        if name not in base:
            raise ShapeMismatchError(
                f"{arg}: {what} tensor {name!r} is not in the base {base.root}; "
                + ("apply a task vector to the base it was diffed against." if kind == "task_vector"
                   else "give the base it was fine-tuned from.")
            )
        t_info, b_info = ckpt.info(name), base.info(name)
        if t_info.shape != b_info.shape:
            raise ShapeMismatchError(
                f"{arg}: tensor {name!r} is {list(t_info.shape)} in the {what} but {list(b_info.shape)} "
                f"in the base {base.root}; "
                + ("apply it to the base it was diffed against." if kind == "task_vector"
                   else "the inputs come from different bases; give the base they share.")
            )
        if not (is_float_dtype(t_info.torch_dtype) and is_float_dtype(b_info.torch_dtype)):
            if kind == "finetune" and t_info.dtype == b_info.dtype:
                continue  # integer buffers of a model are copied from the base
            raise CheckpointFormatError(
                f"{arg}: tensor {name!r} is {t_info.dtype} in the {what} and {b_info.dtype} in the base; "
                "combining needs float tensors on both sides. Remove it from the input."
            )


@torch.no_grad()
def combine(base: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """θ_base + Σ λ_i·τ_i in float32 (``base`` and every τ_i of one shape, any float dtype)."""
    out = base.to(torch.float32, copy=True)
    for weight, delta in terms:
        out.add_(delta.to(torch.float32), alpha=weight)
    return out


def plan_apply(base: Checkpoint, inputs: Sequence[tuple[Checkpoint, float]], target: str | None,
               *, keep_zero_weights: bool = False) -> list[PlannedTensor]:
    """Every base tensor in base order and what happens to it; inputs with λ = 0 touch nothing (unless the
    method ignores weights: ``keep_zero_weights``)."""
    plan = []
    for name, info in base.tensors.items():
        floating = is_float_dtype(info.torch_dtype)
        st = target if (target and floating) else info.dtype
        touching = tuple(i for i, (ckpt, w) in enumerate(inputs)
                         if floating and name in ckpt and (w != 0.0 or keep_zero_weights))
        action = "merge" if touching else ("copy" if st == info.dtype else "cast")
        nbytes = math.prod(info.shape) * torch.empty((), dtype=torch_dtype(st)).element_size()
        plan.append(PlannedTensor(name, action, st, tuple(info.shape), nbytes, touching))
    return plan


def apply_task_vectors(
    base: str | os.PathLike[str],
    tasks: Sequence[TaskArg],
    out: str | os.PathLike[str],
    *,
    options: ApplyOptions | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    dry_run: bool = False,
    block_elements: int = BLOCK_ELEMENTS,
    world: World = SOLO,
) -> ApplyReport:
    """Write BASE combined with ``tasks`` ('INPUT[:λ]' strings or (path, λ) pairs) by ``options.method``.

    With the default task arithmetic, terms with λ = 0 are dropped, so applying only zero weights copies
    the base byte for byte. ``dry_run`` plans and returns without reading a tensor or writing anything.
    ``block_elements``: about how many elements of each input one block holds (the result does not depend on it).
    """
    if not tasks:
        raise OptionError("no inputs given; pass at least one task vector or fine-tune INPUT[:λ] (e.g. ./tau:0.5).")
    options = options or ApplyOptions()
    target = parse_dtype(dtype)
    parsed = [parse_task(t) for t in tasks]
    check_options(options, len(parsed))
    base_path = resolve_path(base)
    for path in [base_path] + [resolve_path(arg) for arg, _ in parsed]:
        refuse_adapter(path, expected="a model or task vector", fix="merge an adapter into its base with "
                       "`surgeon merge BASE ADAPTER`, or mix adapters with `surgeon combine`")
    with ExitStack() as stack:
        b_ckpt = stack.enter_context(Checkpoint.open(base_path))
        opened = [(arg, stack.enter_context(Checkpoint.open(resolve_path(arg))), w) for arg, w in parsed]
        kinds = [input_kind(b_ckpt, ckpt) for _, ckpt, _ in opened]
        for (arg, ckpt, _), kind in zip(opened, kinds):
            _check_input(b_ckpt, arg, ckpt, kind)
            if kind == "task_vector":
                _refuse_weights_as_task_vector(b_ckpt, arg, ckpt)
        weightless = options.spec.kind != "gta"
        plan = plan_apply(b_ckpt, [(c, w) for _, c, w in opened], target, keep_zero_weights=weightless)
        terms = [TaskTerm(a, w, sum(1 for p in plan if i in p.inputs)) for i, (a, _, w) in enumerate(opened)]
        params = {**options.resolved(), "tasks": [{"path": a, "lambda": w} for a, w in parsed],
                  "input_kinds": kinds, "dtype": target or "auto"}
        report = dict(base=str(base), output=str(out), dtype=target or "auto", tasks=terms, kinds=kinds, tensors=len(plan),
                      bytes_written=sum(p.bytes for p in plan), method=options.method, parameters=params, plan=plan)
        if dry_run:
            return ApplyReport(**report, computed=sum(p.action == "merge" for p in plan),
                               copied=sum(p.action == "copy" for p in plan),
                               cast=sum(p.action == "cast" for p in plan), shards=[], dry_run=True)
        record = provenance("apply", params, inputs={"base": str(base),
                                                     **{f"input_{i}": a for i, (a, _) in enumerate(parsed)}})
        specs = [TensorSpec(p.name, p.dtype, p.shape) for p in plan]
        inputs = [base_path] + [resolve_path(a) for a, _ in parsed]
        copy, texts = side_files(b_ckpt, target)  # config.json names the dtype the weights were cast to
        sources = [(c, kinds[i] == "finetune") for i, (_, c, _) in enumerate(opened)]
        weights = [w for _, _, w in opened]
        pool = stack.enter_context(block_workers())
        scratch = ScratchPool()  # |τ| buffers reused from tensor to tensor (freed with the run)

        def open_writer() -> CheckpointWriter:
            return CheckpointWriter(out, specs, inputs=inputs, max_shard_size=max_shard_size, overwrite=overwrite,
                                    metadata=safetensors_metadata(record), extra_files=copy,
                                    extra_texts={**texts, PROVENANCE_FILE: provenance_file_text(record)})

        if world.distributed:  # each rank computes its share (by bytes) into the shared output
            part = plan_share(world, [float(max(p.bytes, 1)) for p in plan])
            mine = [plan[i] for i in part.mine]
            done = write_shared(world, part, open_writer=open_writer, finish=lambda writer, got: None,
                                encode=bool, decode=bool,
                                fill=lambda shards: run_share(part, [p.name for p in mine], (
                                    _write_one(shards, b_ckpt, p, sources, weights, options, pool, block_elements, scratch)
                                    for p in progress(mine, total=len(mine), desc=f"apply {options.method}"))))
            computed = {p.name for p, made in zip(plan, done) if made}
            shards = []
        else:
            with open_writer() as writer:
                computed = {p.name for p in progress(plan, total=len(plan), desc=f"apply {options.method}")
                            if _write_one(writer, b_ckpt, p, sources, weights, options, pool, block_elements,
                                           scratch)}
            shards = writer.shard_files
        cast = sum(1 for p in plan if p.name not in computed and p.dtype != b_ckpt.info(p.name).dtype)
        return ApplyReport(**report, computed=len(computed), copied=len(plan) - len(computed) - cast, cast=cast,
                           shards=shards)


def _write_one(writer: CheckpointWriter | RankShards, base: Checkpoint, entry: PlannedTensor, sources: list[tuple[Checkpoint, bool]],
               weights: list[float], options: ApplyOptions, pool: Executor | None, block_elements: int,
               scratch: ScratchPool | None = None) -> bool:
    """Write one output tensor; True when it was computed, False when copied or only cast.

    A τ that is all zeros (``diff --all`` writes those for identical tensors, an untouched tensor of a
    fine-tune) is no term, so such a tensor stays byte-identical to the base.
    """
    name, st = entry.name, entry.dtype
    if entry.action == "merge":
        terms = [Term(sources[i][0], weights[i], sources[i][1], i) for i in entry.inputs]
        job = TensorMerge(base, name, terms, options, pool=pool, block_elements=block_elements, out_dtype=st,
                          scratch=scratch)
        if job.prepare():
            out_dtype = torch_dtype(st)
            fd, offset = writer.reserve(name)
            check = getattr(writer, "check_finite", None)  # NaN/Inf refused, naming the tensor (not on other ranks)

            def emit(start: int, block: torch.Tensor) -> None:
                cast = block.to(out_dtype)
                if check is not None:
                    check(name, cast)
                pwrite_all(fd, tensor_bytes(cast), offset + start * cast.element_size())

            job.run(emit)
            return True
    if st == base.info(name).dtype:
        writer.copy_from(base, name)
    else:
        writer.write(name, base.get(name).to(torch_dtype(st)))
    return False


def describe_tasks(report: ApplyReport) -> str:
    """'+1·tau_a −0.5·tau_b' for messages."""
    return " ".join(f"{'+' if t.weight >= 0 else '−'}{abs(t.weight):g}·{Path(t.path).name}" for t in report.tasks)
