"""`surgeon merge`: PEFT adapters merged into a base, streamed tensor by tensor.

First a :class:`MergePlan` is built from headers and configs alone
(:func:`plan_adapter_merge`, in ``merge_plan``). Executing it reads one base tensor at
a time, computes W' in float32 on the chosen device (:func:`merged_float32`), rounds
once to the output dtype, measures what the rounding kept of ΔW, and streams it out.
Tensors no adapter touches are copied byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import torch

from surgeon.errors import NumericalError, SurgeonError
from surgeon.io.adapter import Adapter
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import DTYPES, torch_dtype
from surgeon.io.resolve import resolve_path
from surgeon.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec
from surgeon.ops import lora, lycoris
from surgeon.ops.merge_rounding import RoundingStats, round_merged
from surgeon.progress import progress
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text, safetensors_metadata
from surgeon.workflows.convert import FLOAT_DTYPES, parse_dtype
from surgeon.workflows.merge_plan import MergeOp, MergePlan, plan_adapter_merge

__all__ = ["MergeOp", "MergePlan", "MergeReport", "TensorMerge", "merge", "merged_float32", "parse_adapter_arg",
           "plan_adapter_merge"]

LOST_WARNING = 0.5  # warn when more than half of ‖ΔW‖ is lost to output rounding
AdapterArg = Union[str, os.PathLike, tuple[Union[str, os.PathLike], float]]


# -- executing one tensor ---------------------------------------------------------------------
def _factor(plan: MergePlan, op: MergeOp, role: str, device: torch.device) -> torch.Tensor:
    return plan.adapters[op.adapter].weights.get(op.tensors[role], dtype=torch.float32, device=device)


def _vera_shared(plan: MergePlan, op: MergeOp, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if "vera_A" in op.tensors:
        return _factor(plan, op, "vera_A", device), _factor(plan, op, "vera_B", device)
    key = ("vera", op.adapter, str(device))
    if key not in plan._cache:
        vera_A, vera_B = lora.vera_projection(*plan.vera_projections[op.adapter])
        plan._cache[key] = (vera_A.to(device), vera_B.to(device))
    return plan._cache[key]


def _additive_delta(plan: MergePlan, op: MergeOp, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """ΔW of the additive kinds (W' = W + ΔW), float32 in the base's layout."""
    f = lambda role: _factor(plan, op, role, device)  # noqa: E731
    k = op.kind
    if k == "lora":
        return lora.lora_delta(f("lora_A"), f("lora_B"), op.scaling, fan_in_fan_out=op.fan_in_fan_out)
    if k == "lora_embedding":
        return lora.lora_embedding_delta(f("lora_embedding_A"), f("lora_embedding_B"), op.scaling)
    if k == "lora_bias":
        return f("lora_B_bias") * op.scaling
    if k == "adalora":
        return lora.adalora_delta(f("lora_A"), f("lora_B"), f("lora_E"), op.scaling, op.ranknum,
                                  fan_in_fan_out=op.fan_in_fan_out)
    if k == "loha":
        return lycoris.loha_delta(f("hada_w1_a"), f("hada_w1_b"), f("hada_w2_a"), f("hada_w2_b"), op.scaling, tuple(shape))
    if k == "lokr":
        w1 = f("lokr_w1") if "lokr_w1" in op.tensors else f("lokr_w1_a") @ f("lokr_w1_b")
        w2 = f("lokr_w2") if "lokr_w2" in op.tensors else f("lokr_w2_a") @ f("lokr_w2_b")
        return lycoris.lokr_delta(w1, w2, op.scaling, tuple(shape))
    if k == "vera":
        vera_A, vera_B = _vera_shared(plan, op, device)
        delta = lora.vera_delta(vera_A, vera_B, f("vera_lambda_b"), f("vera_lambda_d"), out_features=op.features[0],
                                in_features=op.features[1], fan_in_fan_out=op.fan_in_fan_out)
        return delta if op.weight == 1.0 else delta * op.weight
    raise SurgeonError(f"internal: unknown merge operation {k!r}")


def _apply(plan: MergePlan, op: MergeOp, weight: torch.Tensor, unmerged: torch.Tensor,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One operation: (W merged so far, unmerged W₀) -> (new W, new W₀)."""
    f = lambda role: _factor(plan, op, role, device)  # noqa: E731
    k = op.kind
    if k in ("base_layer", "replace"):
        new = f("tensor")
        if k == "replace" and op.weight != 1.0:  # a weighted modules_to_save moves part of the way
            new = weight + op.weight * (new - weight)
        return new, new
    if k in ("ia3", "ia3_bias"):
        vec = lora.ia3_vector(f("ia3_l"), op.weight)
        if k == "ia3_bias":
            return lora.ia3_bias(weight, vec), unmerged
        return lora.ia3_merge(weight, vec, fan_in_fan_out=op.fan_in_fan_out), unmerged
    if k in ("dora", "dora_embedding"):
        emb = k == "dora_embedding"
        delta = (lora.lora_embedding_delta(f("lora_embedding_A"), f("lora_embedding_B"), op.scaling) if emb
                 else lora.lora_delta(f("lora_A"), f("lora_B"), op.scaling, fan_in_fan_out=op.fan_in_fan_out))
        return lora.dora_merge(weight, unmerged, delta, f("magnitude"), fan_in_fan_out=op.fan_in_fan_out,
                               embedding=emb), unmerged
    if k in ("hira", "hira_embedding"):
        emb = k == "hira_embedding"
        roles = ("hira_embedding_A", "hira_embedding_B") if emb else ("hira_A", "hira_B")
        delta = lora.hira_delta(f(roles[0]), f(roles[1]), fan_in_fan_out=op.fan_in_fan_out, embedding=emb)
        return lora.hira_merge(weight, unmerged, delta if op.weight == 1.0 else delta * op.weight), unmerged
    return weight + _additive_delta(plan, op, weight.shape, device), unmerged


def _merge_one(base: Checkpoint, plan: MergePlan, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' float32, W as stored) for one base tensor, both on ``device``."""
    stored = base.get(name, device=device)
    weight = stored.float()
    unmerged = weight
    for op in plan.targets.get(name, ()):
        weight, unmerged = _apply(plan, op, weight, unmerged, device)
    return weight, stored


def merged_float32(base: Checkpoint, plan: MergePlan, name: str, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """The merged tensor W' for base tensor ``name``: float32, the base tensor's shape, on ``device``.

    Adapters apply in plan order; a tensor no adapter touches comes back as the base, upcast.
    """
    return _merge_one(base, plan, name, torch.device(device))[0]


# -- the merge workflow -----------------------------------------------------------------------
@dataclass(frozen=True)
class TensorMerge:
    """One output tensor the merge wrote other than by copying.

    ``action``: "merged", "replaced" (modules_to_save / saved copies) or "cast only".
    ``changed``: elements whose output differs from the base in the output dtype;
    ``lost_fraction``: ‖round(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖.
    """

    name: str
    action: str
    operations: str
    dtype: str
    numel: int
    changed: int
    delta_norm: float
    lost_fraction: float
    warning: str | None = None


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
                raise SurgeonError(f"{text}: adapter weight {tail!r} is not a finite number; write e.g. {head}:0.5.")
            return resolve_path(head), weight
    return resolve_path(text), 1.0


def pick_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    text = str(device).lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SurgeonError(f"--device {device}: no CUDA device is available to torch here; use --device cpu (or auto).")
        return torch.device(text)
    if text == "cpu":
        return torch.device("cpu")
    raise SurgeonError(f"--device {device!r} is not a device surgeon merges on; use auto, cpu or cuda.")


def _output_dtypes(base: Checkpoint, plan: MergePlan, target: str | None) -> dict[str, str]:
    """Per tensor: the requested dtype for floating tensors, else (auto) the base's own dtype."""
    out = {}
    for name, info in base.tensors.items():
        out[name] = target if (target and info.dtype in FLOAT_DTYPES) else info.dtype
    return out


def _tensor_entry(name: str, plan: MergePlan, dtype: str, stats: RoundingStats) -> TensorMerge:
    ops = plan.targets[name]
    action = "replaced" if all(op.kind in ("replace", "base_layer") for op in ops) else "merged"
    warning = None
    if dtype != "F32" and stats.delta_norm > 0 and stats.lost_fraction > LOST_WARNING:
        warning = (f"{name}: {stats.lost_fraction:.0%} of the adapter's change is lost rounding to {dtype} "
                   f"(only {stats.changed:,} of {stats.numel:,} elements changed); merge with --dtype fp32 to keep it.")
    return TensorMerge(name, action, plan.describe(name), dtype, stats.numel, stats.changed, stats.delta_norm,
                       stats.lost_fraction, warning)


_ADDITIVE = {"lora", "lora_embedding", "lora_bias", "adalora", "loha", "lokr", "vera"}


def _merge_tensor(base: Checkpoint, plan: MergePlan, name: str, dtype: str, device: torch.device,
                  stored: torch.Tensor | None = None, workers: int = 1) -> tuple[torch.Tensor, TensorMerge]:
    """W' rounded to ``dtype`` (on the CPU) and its report entry. Additive-only targets skip the
    full-size W' and add their deltas chunk by chunk while rounding (same order, same bits)."""
    ops = plan.targets[name]
    stored = base.get(name, device=device) if stored is None else stored.to(device)
    if all(op.kind in _ADDITIVE for op in ops):
        deltas = [_additive_delta(plan, op, stored.shape, device) for op in ops]
        out, stats = round_merged(stored, torch_dtype(dtype), deltas=deltas, workers=workers)
    else:
        weight = unmerged = stored.float()
        for op in ops:
            weight, unmerged = _apply(plan, op, weight, unmerged, device)
        out, stats = round_merged(stored, torch_dtype(dtype), merged=weight, workers=workers)
    if stats.nonfinite:
        raise NumericalError(
            f"{name}: the merge ({plan.describe(name)}) produced {stats.nonfinite:,} non-finite values in {dtype}; "
            "the adapter is broken or its scale overflows the dtype. Check it with `surgeon inspect`, lower its "
            "weight, or merge with --dtype fp32."
        )
    return out.to("cpu"), _tensor_entry(name, plan, dtype, stats)


_TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _config_texts(base: Checkpoint, target: str | None) -> tuple[list[Path], dict[str, str]]:
    """Side files to copy, with config.json's dtype rewritten when the output dtype was changed."""
    files = base.extra_files()
    config = base.config()
    if target is None or config is None:
        return files, {}
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    if all(config.get(k) == _TORCH_NAMES[target] for k in keys):
        return files, {}
    config.update({k: _TORCH_NAMES[target] for k in keys})
    return [f for f in files if f.name != "config.json"], {"config.json": json.dumps(config, indent=2) + "\n"}


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
) -> MergeReport:
    """Merge PEFT ``adapters`` (``path``, ``path:weight`` or ``(path, weight)``, applied in order) into
    ``base`` and write a complete model folder (or one ``.safetensors`` file) to ``out``.

    ``dtype``: auto (each tensor keeps the base's dtype) or fp32/fp16/bf16 for the whole output.
    Untouched tensors are copied byte for byte unless that changes their dtype ("cast only").
    """
    started = time.perf_counter()
    target = parse_dtype(dtype)
    dev = pick_device(device)
    base_path = resolve_path(base)
    parsed = [parse_adapter_arg(a) for a in adapters]
    if not parsed:
        raise SurgeonError("no adapter given; name at least one adapter folder after the base.")
    with Checkpoint.open(base_path) as ckpt:
        opened = [Adapter.open(path) for path, _ in parsed]
        try:
            return _execute(ckpt, opened, parsed, out, target=target, dtype_arg=str(dtype or "auto"), device=dev,
                            max_shard_size=max_shard_size, overwrite=overwrite,
                            precision_report=precision_report, started=started, base_arg=str(base))
        finally:
            for adapter in opened:
                adapter.close()


def _execute(ckpt: Checkpoint, opened: list[Adapter], parsed: list[tuple[Path, float]], out: str | os.PathLike[str], *,
             target: str | None, dtype_arg: str, device: torch.device, max_shard_size: int | str, overwrite: bool,
             precision_report: str | os.PathLike[str] | None, started: float, base_arg: str) -> MergeReport:
    plan = plan_adapter_merge(ckpt, [(a, w) for a, (_, w) in zip(opened, parsed)])
    dtypes = _output_dtypes(ckpt, plan, target)
    specs = [TensorSpec(n, dtypes[n], ckpt.info(n).shape) for n in ckpt.keys()]
    adapters_info = [{"path": str(p), "peft_type": a.config.peft_type, "weight": w} for a, (p, w) in zip(opened, parsed)]
    record = provenance("merge", {"adapters": adapters_info, "dtype": dtype_arg, "device": str(device),
                                  "max_shard_size": str(max_shard_size)},
                        inputs={"base": base_arg, **{f"adapter_{i}": str(p) for i, (p, _) in enumerate(parsed)}})
    extra_files, extra_texts = _config_texts(ckpt, target)
    with CheckpointWriter(out, specs, inputs=[ckpt.root, *(p for p, _ in parsed)], max_shard_size=max_shard_size,
                          metadata=safetensors_metadata(record), extra_files=extra_files,
                          extra_texts={**extra_texts, PROVENANCE_FILE: provenance_file_text(record)},
                          overwrite=overwrite) as writer:
        entries = _stream(ckpt, plan, dtypes, writer, device)
        report = _report(ckpt, plan, adapters_info, out, dtype_arg, device, entries, specs, writer, started,
                         precision_report)
        writer.extra_texts[PROVENANCE_FILE] = provenance_file_text(record, _summary(report))
    if precision_report is not None:
        Path(precision_report).write_text(json.dumps(_precision_payload(report), indent=2) + "\n", "utf-8")
    return report


def _stream(ckpt: Checkpoint, plan: MergePlan, dtypes: dict[str, str], writer: CheckpointWriter,
            device: torch.device) -> list[TensorMerge]:
    """Write every tensor in order: merged, cast or copied. Reading the next target and writing the
    previous output overlap with the arithmetic (one reader and one writer thread, at most two
    outputs pending), and on the CPU the chunk loop runs on its own threads, torch single-threaded
    (no per-chunk barrier, which costs dearly on a busy machine)."""
    workers = max(1, torch.get_num_threads()) if device.type == "cpu" else 1
    for header in ckpt.headers:  # open every shard before threads share the checkpoint
        if header.tensors:
            ckpt.fd_and_span(next(iter(header.tensors)))
    targets = [n for n in ckpt.keys() if n in plan.targets]
    entries: list[TensorMerge] = []
    saved_threads = torch.get_num_threads()
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as io:
        if device.type == "cpu":
            torch.set_num_threads(1)
        try:
            ahead = {n: reader.submit(ckpt.get, n) for n in targets[:1]}
            pending: deque[Future[None]] = deque()
            for name in progress(ckpt.keys(), total=len(ckpt), desc="merge"):
                info = ckpt.info(name)
                if name in plan.targets:
                    stored = ahead.pop(name).result()
                    following = targets[targets.index(name) + 1 : targets.index(name) + 2]
                    ahead.update({n: reader.submit(ckpt.get, n) for n in following})
                    tensor, entry = _merge_tensor(ckpt, plan, name, dtypes[name], device, stored, workers)
                    pending.append(io.submit(writer.write, name, tensor))
                    entries.append(entry)
                elif dtypes[name] != info.dtype:
                    pending.append(io.submit(writer.write, name, ckpt.get(name).to(torch_dtype(dtypes[name]))))
                    entries.append(TensorMerge(name, "cast only", "", dtypes[name], info.numel, 0, 0.0, 0.0))
                else:
                    pending.append(io.submit(writer.copy_from, ckpt, name))
                while len(pending) > 2:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        finally:
            torch.set_num_threads(saved_threads)
    return entries


def _report(ckpt: Checkpoint, plan: MergePlan, adapters_info: list[dict[str, Any]], out: str | os.PathLike[str],
            dtype_arg: str, device: torch.device, entries: list[TensorMerge], specs: list[TensorSpec],
            writer: CheckpointWriter, started: float, precision_report: str | os.PathLike[str] | None) -> MergeReport:
    count = lambda action: sum(1 for e in entries if e.action == action)  # noqa: E731
    return MergeReport(
        base=str(ckpt.root), adapters=adapters_info, output=str(out), dtype=dtype_arg, device=str(device),
        tensors=len(specs), merged=count("merged"), replaced=count("replaced"), cast_only=count("cast only"),
        copied=len(specs) - len(entries), bytes_written=sum(s.nbytes for s in specs), shards=writer.shard_files,
        seconds=time.perf_counter() - started, warnings=[e.warning for e in entries if e.warning],
        entries=entries, precision_report=str(precision_report) if precision_report is not None else None,
    )


def _summary(report: MergeReport) -> dict[str, Any]:
    keys = ("adapters", "dtype", "device", "tensors", "merged", "replaced", "cast_only", "copied", "warnings")
    return {k: getattr(report, k) for k in keys}


def _precision_payload(report: MergeReport) -> dict[str, Any]:
    rows = [asdict(e) for e in report.entries if e.action != "cast only"]
    return {"base": report.base, "adapters": report.adapters, "output": report.output, "dtype": report.dtype,
            "columns": {"lost_fraction": "||round(W+dW) - (W+dW)|| / ||dW||",
                        "changed": "elements whose stored value differs from the base's"},
            "tensors": rows, "cast_only": [e.name for e in report.entries if e.action == "cast only"],
            "warnings": report.warnings}
