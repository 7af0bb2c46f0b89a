"""`surgeon merge`: PEFT adapters merged into a base, streamed tensor by tensor.

Three steps, each its own module: a :class:`MergePlan` from headers and configs alone (what acts on
which tensor: ``plan``), a :class:`RoutePlan` (every tensor's route, dtype and bytes out: ``routes``),
then its execution (``execute``, with the per-tensor routes in ``stream``). This module ties them
together: opens the inputs, writes the output folder with provenance, and reports.
``merge(..., dry_run=True)`` stops after the route plan and writes nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from surgeon.errors import OptionError
from surgeon.io.adapter import Adapter
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.finite_inputs import refuse_non_finite_adapter
from surgeon.io.model_config import side_files
from surgeon.io.output import check_side_output, write_side_output
from surgeon.io.resolve import resolve_path
from surgeon.io.roles import refuse_adapter
from surgeon.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec
from surgeon.parallel.exchange import device_for
from surgeon.parallel.world import SOLO, World
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text, safetensors_metadata
from surgeon.workflows.convert import FLOAT_DTYPES, parse_dtype
from surgeon.workflows.device import device_name, pick_device  # noqa: F401 - re-exported for callers
from surgeon.workflows.merge.base_quant import resolve_base_quant, with_base_quant
from surgeon.workflows.merge.plan import MergeOp, MergePlan, plan_adapter_merge
from surgeon.workflows.merge.routes import STREAM_CHUNK, RoutePlan, plan_routes
from surgeon.workflows.merge.stream import TensorMerge
from surgeon.workflows.merge.vocab import VocabChanges, patch_config
from surgeon.workflows.merge.vocab import prepare as prepare_vocab

if TYPE_CHECKING:
    import torch

# torch (~2 s to import) is imported only when a tensor needs it: a merge of LoRA-family deltas into a
# bf16/fp16/fp32 base on the CPU runs on the native kernel (surgeon.ops.native_merge) without it.

__all__ = ["MergeDryRun", "MergeOp", "MergeOptions", "MergePlan", "MergeReport", "TensorMerge", "merge",
           "merged_float32", "parse_adapter_arg", "pick_device", "plan_adapter_merge"]

AdapterArg = Union[str, os.PathLike, tuple[Union[str, os.PathLike], float]]


def merged_float32(base: Checkpoint, plan: MergePlan, name: str, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """The merged tensor W' for base tensor ``name``: float32, the base tensor's shape, on ``device``.

    Adapters apply in plan order; a tensor no adapter touches comes back as the base, upcast.
    """
    import torch

    from surgeon.workflows.merge.apply import merge_one

    return merge_one(base, plan, name, torch.device(device))[0]


# -- the merge workflow -----------------------------------------------------------------------
@dataclass(frozen=True)
class MergeOptions:
    """How to merge. ``dtype``: auto (each tensor keeps the base's dtype) or fp32/fp16/bf16 for the whole
    output; ``engine``: auto, native, torch or memory (see ``routes.plan_routes``); ``chunk``: elements
    per streamed block."""

    dtype: str | None = "auto"
    device: str = "auto"
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    overwrite: bool = False
    precision_report: str | None = None
    engine: str = "auto"
    chunk: int = STREAM_CHUNK
    base_quant: str | None = None  # nf4, fp4, none, or None: the adapter's recorded quantization config decides


@dataclass(frozen=True)
class MergeReport:
    base: str
    adapters: list[dict[str, Any]]
    output: str
    dtype: str
    device: str
    tensors: int
    merged: int
    replaced: int
    cast_only: int
    copied: int
    bytes_written: int
    shards: list[str]
    seconds: float
    warnings: list[str]
    entries: list[TensorMerge]
    precision_report: str | None = None
    notes: list[str] = field(default_factory=list)  # what the merge decided for the user (base_quant, vocab)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MergeDryRun:
    """What ``merge`` would do, written nowhere: every tensor's action, route, dtype and bytes out."""

    base: str
    adapters: list[dict[str, Any]]
    output: str
    dtype: str
    routes: RoutePlan

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": True, "base": self.base, "adapters": self.adapters, "output": self.output,
                "dtype": self.dtype, **self.routes.to_dict()}


@dataclass(frozen=True)
class _Job:
    """One merge's resolved inputs, passed from step to step."""

    ckpt: Checkpoint
    plan: MergePlan
    sources: tuple[tuple[Path, float], ...]
    out: str
    options: MergeOptions
    target: str | None  # the output dtype asked for (None: auto)
    device: str
    base_arg: str
    notes: tuple[str, ...] = ()
    vocab: VocabChanges = field(default_factory=VocabChanges)  # resized / untied embeddings (merge.vocab)
    world: World = SOLO  # the process group sharing the tensors (merge.execute_shared)

    @property
    def adapters_info(self) -> list[dict[str, Any]]:
        return [{"path": str(p), "peft_type": a.config.peft_type, "weight": w}
                for a, (p, w) in zip(self.plan.adapters, self.sources)]


def parse_adapter_arg(arg: AdapterArg) -> tuple[Path, float]:
    """'path', 'path:0.5' or (path, 0.5) -> (local path, weight). An existing path wins over a ':'."""
    if isinstance(arg, tuple):
        return resolve_path(arg[0]), float(arg[1])
    text = os.fspath(arg)
    head, sep, tail = text.rpartition(":")
    if sep and head and not Path(text).exists():
        try:
            weight = float(tail)
        except ValueError:
            weight = None
        if weight is not None:
            if not math.isfinite(weight):
                raise OptionError(f"{text}: adapter weight {tail!r} is not a finite number; write e.g. {head}:0.5.")
            return resolve_path(head), weight
    return resolve_path(text), 1.0


def _output_dtypes(base: Checkpoint, target: str | None) -> dict[str, str]:
    """Per tensor: the requested dtype for floating tensors, else (auto) the base's own dtype."""
    out = {}
    for name, info in base.tensors.items():
        out[name] = target if (target and info.dtype in FLOAT_DTYPES) else info.dtype
    return out


def merge(
    base: str | os.PathLike[str],
    adapters: Sequence[AdapterArg],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = "auto",
    device: str | torch.device = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    precision_report: str | os.PathLike[str] | None = None,
    engine: str = "auto",
    chunk: int = STREAM_CHUNK,
    dry_run: bool = False,
    base_quant: str | None = None,
    world: World = SOLO,
) -> MergeReport | MergeDryRun:
    """Merge PEFT ``adapters`` (``path``, ``path:weight`` or ``(path, weight)``, applied in order) into
    ``base`` and write a complete model folder (or one ``.safetensors`` file) to ``out``.

    ``dtype``: auto (each tensor keeps the base's dtype) or fp32/fp16/bf16 for the whole output.
    Untouched tensors are copied byte for byte unless that changes their dtype ("cast only").
    ``dry_run``: return the plan (:class:`MergeDryRun`) and write nothing.
    ``base_quant``: nf4/fp4 rounds the base through bitsandbytes' 4-bit quantization first (a QLoRA
    adapter's base), none never; None (default) follows the adapter's recorded quantization config.
    """
    started = time.perf_counter()
    options = MergeOptions(dtype=dtype, device=str(device), max_shard_size=max_shard_size, overwrite=overwrite,
                           precision_report=None if precision_report is None else os.fspath(precision_report),
                           engine=engine, chunk=chunk, base_quant=base_quant)
    parsed = tuple(parse_adapter_arg(a) for a in adapters)
    if not parsed:
        raise OptionError("no adapter given; name at least one adapter folder after the base.")
    target, dev = parse_dtype(dtype), device_name(device_for(world, str(device)))
    refuse_adapter(resolve_path(base), expected="a base model", fix="give the base model first and the adapters "
                   "after it: surgeon merge BASE ADAPTER [ADAPTER...]")
    with Checkpoint.open(resolve_path(base)) as ckpt:
        opened = [Adapter.open(path) for path, _ in parsed]
        try:
            for adapter in opened:  # a NaN factor is named here, not as a merged matrix full of NaN
                refuse_non_finite_adapter(adapter.weights)
            view, vocab = prepare_vocab(ckpt, opened)  # added tokens, untied lm_head: the base as the adapters see it
            plan = plan_adapter_merge(view, [(a, w) for a, (_, w) in zip(opened, parsed)])
            quant = resolve_base_quant(base_quant, opened)
            plan = with_base_quant(plan, view, quant)
            notes = ((quant.note(),) if quant else ()) + vocab.notes
            job = _Job(view, plan, parsed, os.fspath(out), options, target, dev, str(base), notes, vocab, world)
            dtypes = {**_output_dtypes(view, target), **(vocab.dtypes if target is None else {})}
            routes = plan_routes(view, plan, dtypes, device=dev, engine=engine, chunk=chunk)
            if dry_run:
                return MergeDryRun(str(ckpt.root), job.adapters_info, job.out, str(dtype or "auto"), routes)
            return _execute(job, routes, started)
        finally:
            for adapter in opened:
                adapter.close()


def _execute(job: _Job, routes: RoutePlan, started: float) -> MergeReport:
    from surgeon.workflows.merge.execute import execute

    ckpt, options = job.ckpt, job.options
    specs = [TensorSpec(t.name, t.dtype, ckpt.info(t.name).shape) for t in routes.tensors]
    record = provenance("merge", {"adapters": job.adapters_info, "dtype": str(options.dtype or "auto"),
                                  "device": job.device, "max_shard_size": str(options.max_shard_size),
                                  **({"base_quant": job.notes[0]} if job.notes else {})},
                        inputs={"base": job.base_arg, **{f"adapter_{i}": str(p) for i, (p, _) in enumerate(job.sources)}})
    extra_files, extra_texts = patch_config(ckpt, *side_files(ckpt, job.target), job.vocab)
    side_inputs = [ckpt.root, *(p for p, _ in job.sources)]
    if options.precision_report is not None and job.world.is_main:  # before any work: fail now, not after
        check_side_output(options.precision_report, overwrite=options.overwrite, inputs=side_inputs,
                          outputs=[job.out], what="precision report")
    if job.world.distributed:
        return _execute_shared(job, routes, started, specs, record, extra_files, extra_texts, side_inputs)
    with CheckpointWriter(job.out, specs, inputs=[ckpt.root, *(p for p, _ in job.sources)],
                          max_shard_size=options.max_shard_size, metadata=safetensors_metadata(record),
                          extra_files=extra_files, extra_texts={**extra_texts, PROVENANCE_FILE: provenance_file_text(record)},
                          overwrite=options.overwrite) as writer:
        entries = execute(ckpt, job.plan, routes, writer)
        report = _report(job, entries, routes, writer.shard_files, started)
        writer.extra_texts[PROVENANCE_FILE] = provenance_file_text(record, _summary(report))
    if options.precision_report is not None:
        write_side_output(options.precision_report, json.dumps(_precision_payload(report), indent=2) + "\n",
                          overwrite=options.overwrite, inputs=side_inputs, what="precision report")
    return report


def _execute_shared(job: _Job, routes: RoutePlan, started: float, specs: list[TensorSpec], record: dict[str, Any],
                    extra_files: Any, extra_texts: dict[str, str], side_inputs: list[Any]) -> MergeReport:
    """Every rank merges its share into the shared output (:mod:`surgeon.workflows.merge.execute_shared`)."""
    from surgeon.workflows.merge.execute_shared import execute_shared

    options, made = job.options, {}

    def open_writer() -> CheckpointWriter:
        return CheckpointWriter(job.out, specs, inputs=[job.ckpt.root, *(p for p, _ in job.sources)],
                                max_shard_size=options.max_shard_size, metadata=safetensors_metadata(record),
                                extra_files=extra_files,
                                extra_texts={**extra_texts, PROVENANCE_FILE: provenance_file_text(record)},
                                overwrite=options.overwrite)

    def finish(writer: CheckpointWriter, entries: list[TensorMerge]) -> None:
        made["report"] = _report(job, entries, routes, writer.shard_files, started)
        writer.extra_texts[PROVENANCE_FILE] = provenance_file_text(record, _summary(made["report"]))

    entries = execute_shared(job.world, job.ckpt, job.plan, routes, open_writer=open_writer, finish=finish)
    report = made.get("report") or _report(job, entries, routes, [], started)
    if options.precision_report is not None and job.world.is_main:
        write_side_output(options.precision_report, json.dumps(_precision_payload(report), indent=2) + "\n",
                          overwrite=options.overwrite, inputs=side_inputs, what="precision report")
    return report


def _report(job: _Job, entries: list[TensorMerge], routes: RoutePlan, shards: list[str], started: float) -> MergeReport:
    count = lambda action: sum(1 for e in entries if e.action == action)  # noqa: E731
    return MergeReport(
        base=str(job.ckpt.root), adapters=job.adapters_info, output=job.out, dtype=str(job.options.dtype or "auto"),
        device=job.device, tensors=len(routes.tensors), merged=count("merged"), replaced=count("replaced"),
        cast_only=count("cast only"), copied=len(routes.tensors) - len(entries), bytes_written=routes.bytes_out,
        shards=shards, seconds=time.perf_counter() - started, warnings=[e.warning for e in entries if e.warning],
        entries=entries, precision_report=job.options.precision_report, notes=list(job.notes) + routes.notes,
    )


def _summary(report: MergeReport) -> dict[str, Any]:
    keys = ("adapters", "dtype", "device", "tensors", "merged", "replaced", "cast_only", "copied", "warnings")
    return {k: getattr(report, k) for k in keys}


def _precision_payload(report: MergeReport) -> dict[str, Any]:
    rows = [asdict(e) for e in report.entries if e.action != "cast only"]
    return {"base": report.base, "adapters": report.adapters, "output": report.output, "dtype": report.dtype,
            "columns": {"lost_fraction": "||round(W+dW) - (W+dW)|| / ||dW||",
                        "changed": "elements whose stored value differs from the base's",
                        "base_quant_error": "||dequant(quant(W)) - W|| of the 4-bit base round trip (--base-quant)"},
            "tensors": rows, "cast_only": [e.name for e in report.entries if e.action == "cast only"],
            "warnings": report.warnings, "notes": report.notes}
