"""`surgeon merge`: PEFT adapters merged into a base, streamed tensor by tensor.

First a :class:`MergePlan` is built from headers and configs alone
(:func:`plan_adapter_merge`, in ``merge_plan``). Executing it reads one base tensor at
a time, computes W' in float32 on the chosen device (:func:`merged_float32`), rounds
once to the output dtype, measures what the rounding kept of ΔW, and streams it out.
Tensors no adapter touches are copied byte for byte.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from surgeon.errors import NumericalError, OptionError
from surgeon.io.adapter import Adapter
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import pread_into, torch_dtype
from surgeon.io.resolve import resolve_path
from surgeon.io.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    CheckpointWriter,
    TensorSpec,
    copy_span,
    pwrite_all,
)
from surgeon.ops import native_merge
from surgeon.ops.native_merge import LoraFactors, RoundingStats
from surgeon.progress import progress
from surgeon.provenance import (
    PROVENANCE_FILE,
    provenance,
    provenance_file_text,
    safetensors_metadata,
)
from surgeon.workflows.convert import FLOAT_DTYPES, parse_dtype
from surgeon.workflows.device import device_name, pick_device  # noqa: F401 - re-exported for callers
from surgeon.workflows.merge.plan import MergeOp, MergePlan, plan_adapter_merge

if TYPE_CHECKING:
    import torch

    from surgeon.workflows.merge.apply import Scratch

# torch (~2 s to import) is imported only when a tensor needs it: a merge of LoRA-family deltas into a
# bf16/fp16/fp32 base on the CPU runs on the native kernel (surgeon.ops.native_merge) without it.

__all__ = ["MergeOp", "MergePlan", "MergeReport", "TensorMerge", "merge", "merged_float32", "parse_adapter_arg",
           "pick_device", "plan_adapter_merge"]

LOST_WARNING = 0.5  # warn when more than half of ‖ΔW‖ is lost to output rounding
STREAM_CHUNK = 1 << 17  # elements per block when streaming (with 2 threads, measured best of 64K-1M)
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
                raise OptionError(f"{text}: adapter weight {tail!r} is not a finite number; write e.g. {head}:0.5.")
            return resolve_path(head), weight
    return resolve_path(text), 1.0


def _output_dtypes(base: Checkpoint, target: str | None) -> dict[str, str]:
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


def _merge_tensor(plan: MergePlan, name: str, dtype: str, device: torch.device, stored: torch.Tensor, *,
                  workers: int = 1, scratch: Scratch | None = None,
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, TensorMerge]:
    """W' rounded to ``dtype`` (on the CPU, in ``out`` if given) and its report entry. Additive-only
    targets skip the full-size W' and add their deltas chunk by chunk while rounding (same order, same bits)."""
    from surgeon.ops.merge_rounding import round_merged
    from surgeon.workflows.merge.apply import ADDITIVE, additive_delta, apply_op

    ops = plan.targets[name]
    stored = stored.to(device)
    out_dtype = torch_dtype(dtype)
    buffer = out if device.type == "cpu" else None
    if all(op.kind in ADDITIVE for op in ops):
        deltas = [additive_delta(plan, op, stored.shape, device, scratch, ("delta", i)) for i, op in enumerate(ops)]
        rounded, stats = round_merged(stored, out_dtype, deltas=deltas, workers=workers, out=buffer)
    else:
        weight = unmerged = stored.float()
        for op in ops:
            weight, unmerged = apply_op(plan, op, weight, unmerged, device)
        rounded, stats = round_merged(stored, out_dtype, merged=weight, workers=workers, out=buffer)
    _check_finite(plan, name, dtype, stats)
    return rounded.to("cpu"), _tensor_entry(name, plan, dtype, stats)


def _check_finite(plan: MergePlan, name: str, dtype: str, stats: RoundingStats) -> None:
    if stats.nonfinite:
        raise NumericalError(
            f"{name}: the merge ({plan.describe(name)}) produced {stats.nonfinite:,} non-finite values in {dtype}; "
            "the adapter is broken or its scale overflows the dtype. Check it with `surgeon inspect`, lower its "
            "weight, or merge with --dtype fp32."
        )


def _streamable(plan: MergePlan, name: str, device: str) -> bool:
    from surgeon.workflows.merge.apply import ADDITIVE

    return device == "cpu" and all(op.kind in ADDITIVE for op in plan.targets[name])


_NATIVE_FACTOR_DTYPES = ("F32", "F16", "BF16", "F64")


def _native(ckpt: Checkpoint, plan: MergePlan, name: str, out_dtype: str) -> bool:
    """Whether the native kernel merges this target: LoRA deltas only, on a 2-D bf16/fp16/fp32 weight."""
    info = ckpt.info(name)
    if len(info.shape) != 2 or info.numel == 0 or not {info.dtype, out_dtype} <= set(native_merge.DTYPE_CODES):
        return False
    for op in plan.targets[name]:
        weights = plan.adapters[op.adapter].weights
        if op.kind != "lora" or any(weights.info(op.tensors[role]).dtype not in _NATIVE_FACTOR_DTYPES
                                    for role in ("lora_A", "lora_B")):
            return False
    return True


def _block_io(ckpt: Checkpoint, name: str, dest: tuple[int, int]
              ) -> tuple[Callable[[int, int, memoryview], memoryview], Callable[[int, memoryview], None]]:
    """``read(pos, nbytes, buf)``: base tensor ``name``'s stored bytes [pos, pos+nbytes) into ``buf`` (returned,
    trimmed); ``write(pos, data)``: ``data`` at byte ``pos`` of the output tensor's reserved place ``dest``.
    Positional both ways, so any thread may call them."""
    info = ckpt.info(name)
    fd_in, start, _ = ckpt.fd_and_span(name)
    fd_out, offset = dest

    def read(pos: int, nbytes: int, buf: memoryview) -> memoryview:
        pread_into(fd_in, buf[:nbytes], start + pos, info.file)
        return buf[:nbytes]

    def write(pos: int, data: memoryview) -> None:
        pwrite_all(fd_out, data, offset + pos)

    return read, write


def _native_tensor(ckpt: Checkpoint, plan: MergePlan, name: str, dtype: str, dest: tuple[int, int], workers: int,
                   pool: ThreadPoolExecutor, lib: Any) -> TensorMerge:
    """A LoRA target merged by the native kernel from the base file straight into the output file: blocks of
    rows are read, merged (every B·A element as torch computes it), rounded, measured and ``pwrite``-n while
    in cache. No whole tensor is held; the same bits as the torch paths."""
    info = ckpt.info(name)
    read, write = _block_io(ckpt, name, dest)
    factors = []
    for op in plan.targets[name]:
        weights = plan.adapters[op.adapter].weights
        factors.append(LoraFactors.of(weights.float32_array(op.tensors["lora_A"]),
                                      weights.float32_array(op.tensors["lora_B"]), op.scaling,
                                      fan_in_fan_out=op.fan_in_fan_out))
    stats = native_merge.stream_lora_merge(lib, info.shape, info.dtype, dtype, factors, read=read, write=write,
                                           workers=workers, chunk=STREAM_CHUNK, pool=pool)
    _check_finite(plan, name, dtype, stats)
    return _tensor_entry(name, plan, dtype, stats)


def _stream_tensor(ckpt: Checkpoint, plan: MergePlan, name: str, dtype: str, dest: tuple[int, int],
                   workers: int, pool: ThreadPoolExecutor) -> TensorMerge:
    """An additive-only target the native kernel does not take (LoHa, LoKr, VeRA, ..., or no C compiler),
    merged chunk by chunk in torch from the base file straight into the output file: read a block of rows,
    add each ΔW block (a LoRA's B·A computed per row block), round, measure, and ``pwrite`` the block while
    it is still in cache. No whole tensor is held; same bits as the in-memory path."""
    import torch

    from surgeon.ops.lora import lora_delta_rows
    from surgeon.ops.merge_rounding import stream_merged
    from surgeon.workflows.merge.apply import additive_delta

    info = ckpt.info(name)
    read_bytes, write_bytes = _block_io(ckpt, name, dest)
    stored_dtype, out_dtype = info.torch_dtype, torch_dtype(dtype)
    in_size, out_size = stored_dtype.itemsize, out_dtype.itemsize
    cols = info.shape[-1] if len(info.shape) > 1 else 1
    cpu = torch.device("cpu")

    def read(i: int, n: int, buf: torch.Tensor) -> torch.Tensor:
        read_bytes(i * in_size, n * in_size, memoryview(buf.numpy()))
        return buf[: n * in_size].view(stored_dtype)

    def write(i: int, rounded: torch.Tensor) -> None:
        write_bytes(i * out_size, memoryview(rounded.view(torch.uint8).numpy()))

    def lora_rows(op: MergeOp):
        lora_A, lora_B = (plan.adapters[op.adapter].weights.get(op.tensors[r], dtype=torch.float32) for r in ("lora_A", "lora_B"))
        return lambda i, n, buf: lora_delta_rows(lora_A, lora_B, op.scaling, slice(i // cols, (i + n) // cols),
                                                 fan_in_fan_out=op.fan_in_fan_out, out=buf)

    deltas = [lora_rows(op) if op.kind == "lora" and len(info.shape) == 2 else additive_delta(plan, op, info.shape, cpu)
              for op in plan.targets[name]]
    stats = stream_merged(info.shape, stored_dtype, out_dtype, read=read, deltas=deltas, write=write, workers=workers,
                          chunk=STREAM_CHUNK, pool=pool)
    _check_finite(plan, name, dtype, stats)
    return _tensor_entry(name, plan, dtype, stats)


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
    dev = device_name(device)
    base_path = resolve_path(base)
    parsed = [parse_adapter_arg(a) for a in adapters]
    if not parsed:
        raise OptionError("no adapter given; name at least one adapter folder after the base.")
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
             target: str | None, dtype_arg: str, device: str, max_shard_size: int | str, overwrite: bool,
             precision_report: str | os.PathLike[str] | None, started: float, base_arg: str) -> MergeReport:
    plan = plan_adapter_merge(ckpt, [(a, w) for a, (_, w) in zip(opened, parsed)])
    dtypes = _output_dtypes(ckpt, target)
    specs = [TensorSpec(n, dtypes[n], ckpt.info(n).shape) for n in ckpt.keys()]
    adapters_info = [{"path": str(p), "peft_type": a.config.peft_type, "weight": w} for a, (p, w) in zip(opened, parsed)]
    record = provenance("merge", {"adapters": adapters_info, "dtype": dtype_arg, "device": device,
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


class _Buffers:
    """Reused memory for the torch paths: two read buffers (one being prefetched) and a ring of output
    buffers, each released only when the write that uses it has finished."""

    def __init__(self, ring: int = 3) -> None:
        from surgeon.workflows.merge.apply import Scratch

        self.reads = [bytearray(), bytearray()]
        self.outs: list[tuple[torch.Tensor | None, Future[None] | None]] = [(None, None)] * ring
        self.scratch = Scratch()

    def read(self, ckpt: Checkpoint, name: str, slot: int) -> torch.Tensor:
        import torch

        info = ckpt.info(name)
        if info.numel == 0:
            return ckpt.get(name)
        if len(self.reads[slot]) < info.nbytes:
            self.reads[slot] = bytearray(info.nbytes)
        fd, start, length = ckpt.fd_and_span(name)
        pread_into(fd, memoryview(self.reads[slot])[:length], start, info.file)
        return torch.frombuffer(self.reads[slot], dtype=info.torch_dtype, count=info.numel).reshape(info.shape)

    def out(self, slot: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        import torch

        buf, pending = self.outs[slot]
        if pending is not None:
            pending.result()
        if buf is None or buf.numel() * buf.element_size() < numel * dtype.itemsize:
            buf = torch.empty(numel * dtype.itemsize, dtype=torch.uint8)
        self.outs[slot] = (buf, None)
        return buf[: numel * dtype.itemsize].view(dtype)

    def written(self, slot: int, future: Future[None]) -> None:
        self.outs[slot] = (self.outs[slot][0], future)


def _cpu_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on every platform
        return max(1, os.cpu_count() or 1)


def _stream(ckpt: Checkpoint, plan: MergePlan, dtypes: dict[str, str], writer: CheckpointWriter,
            device: str) -> list[TensorMerge]:
    """Write every tensor in order: merged, cast or copied. On the CPU, LoRA targets go through the native
    kernel (:func:`_native_tensor`) and other additive-only targets (LoHa, LoKr, ...) stream in torch
    (:func:`_stream_tensor`), both block by block from the base file to the output file; the others are
    merged whole, with reading the next one and writing the previous output overlapping the arithmetic (one
    reader and one writer thread) and memory reused rather than page-faulted anew for every tensor. torch
    is imported only if some tensor needs it. The block loops run on their own threads (torch single-threaded
    then: no per-chunk barrier, which costs dearly on a busy machine)."""
    on_cpu = device == "cpu"
    targets = [n for n in ckpt.keys() if n in plan.targets]
    lib = native_merge.kernel() if on_cpu and targets else None
    native = {n for n in targets if lib is not None and _native(ckpt, plan, n, dtypes[n])}
    torch_needed = len(native) < len(targets) or any(
        dtypes[n] != ckpt.info(n).dtype for n in ckpt.keys() if n not in plan.targets)
    workers = _cpu_workers() if on_cpu else 1
    for header in ckpt.headers:  # open every shard before threads share the checkpoint
        if header.tensors:
            ckpt.fd_and_span(next(iter(header.tensors)))
    order = {n: i for i, n in enumerate(targets)}
    streamed = {n for n in targets if n in native or (torch_needed and _streamable(plan, n, device))}
    in_memory = [n for n in targets if n not in streamed]
    position = {n: i for i, n in enumerate(in_memory)}
    # Everything merged in place or copied as is: copies go to their reserved places in the background,
    # overlapping the merge (otherwise they keep the writer's order).
    positional = not in_memory and not any(dtypes[n] != ckpt.info(n).dtype for n in ckpt.keys())
    entries: list[TensorMerge] = []
    torch = None
    if torch_needed:
        import torch
    saved_threads, collecting = (torch.get_num_threads() if torch else 0), gc.isenabled()
    buffers = _Buffers() if in_memory else None
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as io, ThreadPoolExecutor(workers) as pool:
        try:
            gc.disable()  # the loop makes few objects; collections would only cost time
            if torch and on_cpu:
                torch.set_num_threads(1)
            ahead = {n: reader.submit(buffers.read, ckpt, n, 0) for n in in_memory[:1]}
            if targets:
                _read_ahead(ckpt, plan, targets[0])
            pending: deque[Future[None]] = deque()
            copies: list[Future[None]] = []
            for name in progress(ckpt.keys(), total=len(ckpt), desc="merge"):
                info = ckpt.info(name)
                if positional and name not in streamed:
                    copies.append(io.submit(copy_span, ckpt, name, *writer.reserve(name)))
                    continue
                if name in streamed:
                    while pending:  # the writer is strictly ordered: everything before this tensor first
                        pending.popleft().result()
                    upcoming = targets[order[name] + 1 : order[name] + 2]
                    if upcoming:  # let the kernel read the next target ahead while this one is computed
                        _read_ahead(ckpt, plan, upcoming[0])
                    if name in native:
                        entry = _native_tensor(ckpt, plan, name, dtypes[name], writer.reserve(name), workers, pool,
                                               lib)
                    else:
                        entry = _stream_tensor(ckpt, plan, name, dtypes[name], writer.reserve(name), workers, pool)
                    entries.append(entry)
                    continue
                if name in plan.targets:
                    k = position[name]
                    stored = ahead.pop(name).result()
                    ahead.update({n: reader.submit(buffers.read, ckpt, n, (k + 1) % 2) for n in in_memory[k + 1 : k + 2]})
                    out = buffers.out(k % len(buffers.outs), info.numel, torch_dtype(dtypes[name]))
                    tensor, entry = _merge_tensor(plan, name, dtypes[name], torch.device(device), stored,
                                                  workers=workers, scratch=buffers.scratch, out=out)
                    future = io.submit(writer.write, name, tensor)
                    buffers.written(k % len(buffers.outs), future)
                    entries.append(entry)
                elif dtypes[name] != info.dtype:
                    future = io.submit(writer.write, name, ckpt.get(name).to(torch_dtype(dtypes[name])))
                    entries.append(TensorMerge(name, "cast only", "", dtypes[name], info.numel, 0, 0.0, 0.0))
                else:
                    future = io.submit(writer.copy_from, ckpt, name)
                pending.append(future)
                while len(pending) > 2:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
            for future in copies:
                future.result()
        finally:
            if torch:
                torch.set_num_threads(saved_threads)
            if collecting:
                gc.enable()
    return entries


def _read_ahead(ckpt: Checkpoint, plan: MergePlan, name: str) -> None:
    """Ask the kernel to start reading base tensor ``name`` and the adapter tensors acting on it."""
    spans = [ckpt.fd_and_span(name)]
    for op in plan.targets[name]:
        weights = plan.adapters[op.adapter].weights
        spans += [weights.fd_and_span(t) for t in op.tensors.values() if t in weights.tensors]
    for fd, start, length in spans:
        try:
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
        except (AttributeError, OSError):  # not on every platform; only a hint
            return


def _report(ckpt: Checkpoint, plan: MergePlan, adapters_info: list[dict[str, Any]], out: str | os.PathLike[str],
            dtype_arg: str, device: str, entries: list[TensorMerge], specs: list[TensorSpec],
            writer: CheckpointWriter, started: float, precision_report: str | os.PathLike[str] | None) -> MergeReport:
    count = lambda action: sum(1 for e in entries if e.action == action)  # noqa: E731
    return MergeReport(
        base=str(ckpt.root), adapters=adapters_info, output=str(out), dtype=dtype_arg, device=device,
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
