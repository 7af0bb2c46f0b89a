"""The three merge routes for one tensor: native (C kernel) and torch-streamed, both block by block from
the base file into the output file's reserved place, and in memory (the whole tensor, for everything
the streamers do not take). Each returns the tensor's :class:`TensorMerge` entry.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from surgeon.errors import NumericalError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import pread_into, torch_dtype
from surgeon.io.writer import pwrite_all
from surgeon.ops import native_merge
from surgeon.ops.native_merge import LoraFactors, RoundingStats
from surgeon.workflows.merge.base_quant import quant_error
from surgeon.workflows.merge.plan import MergeOp, MergePlan

if TYPE_CHECKING:
    import torch

    from surgeon.workflows.merge.apply import Scratch

LOST_WARNING = 0.5  # warn when more than half of ‖ΔW‖ is lost to output rounding


@dataclass(frozen=True)
class TensorMerge:
    """One output tensor the merge wrote other than by copying.

    ``action``: "merged", "replaced" (modules_to_save / saved copies) or "cast only".
    ``changed``: elements whose output differs from the base in the output dtype;
    ``lost_fraction``: ‖round(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖. ``route``: how it was computed (see ``routes``).
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
    route: str = ""
    base_quant_error: float | None = None  # ‖dequant(W) − W‖ when --base-quant rounded the base (base_quant)


@dataclass(frozen=True)
class BlockJob:
    """What a streamed route needs for one tensor: where the output goes and how the blocks are shared."""

    dest: tuple[int, int]  # (fd, offset) of the output tensor's reserved place
    workers: int
    chunk: int
    pool: ThreadPoolExecutor


def tensor_entry(name: str, plan: MergePlan, dtype: str, stats: RoundingStats, route: str) -> TensorMerge:
    ops = plan.targets[name]
    action = "replaced" if all(op.kind in ("replace", "base_layer") for op in ops) else "merged"
    warning = None
    if dtype != "F32" and stats.delta_norm > 0 and stats.lost_fraction > LOST_WARNING:
        warning = (f"{name}: {stats.lost_fraction:.0%} of the adapter's change is lost rounding to {dtype} "
                   f"(only {stats.changed:,} of {stats.numel:,} elements changed); merge with --dtype fp32 to keep it.")
    return TensorMerge(name, action, plan.describe(name), dtype, stats.numel, stats.changed, stats.delta_norm,
                       stats.lost_fraction, warning, route, quant_error(plan, name))


def check_finite(plan: MergePlan, name: str, dtype: str, stats: RoundingStats) -> None:
    if stats.nonfinite:
        raise NumericalError(
            f"{name}: the merge ({plan.describe(name)}) produced {stats.nonfinite:,} non-finite values in {dtype}; "
            "the adapter is broken or its scale overflows the dtype. Check it with `surgeon inspect`, lower its "
            "weight, or merge with --dtype fp32."
        )


def memory_tensor(plan: MergePlan, name: str, dtype: str, device: torch.device, stored: torch.Tensor, *,
                  workers: int = 1, scratch: Scratch | None = None,
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, TensorMerge]:
    """W' rounded to ``dtype`` (on the CPU, in ``out`` if given) and its report entry. Additive-only
    targets skip the full-size W' and add their deltas chunk by chunk while rounding (same order, same bits)."""
    from surgeon.ops.merge_rounding import round_merged
    from surgeon.workflows.merge.apply import ADDITIVE, additive_delta, apply_ops

    ops = plan.targets[name]
    stored = stored.to(device)
    out_dtype = torch_dtype(dtype)
    buffer = out if device.type == "cpu" else None
    if all(op.kind in ADDITIVE for op in ops):
        deltas = [additive_delta(plan, op, stored.shape, device, scratch, ("delta", i)) for i, op in enumerate(ops)]
        rounded, stats = round_merged(stored, out_dtype, deltas=deltas, workers=workers, out=buffer)
    else:
        weight = unmerged = stored.float()
        weight, unmerged = apply_ops(plan, ops, weight, unmerged, device)
        rounded, stats = round_merged(stored, out_dtype, merged=weight, workers=workers, out=buffer)
    check_finite(plan, name, dtype, stats)
    return rounded.to("cpu"), tensor_entry(name, plan, dtype, stats, "memory")


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


def native_tensor(ckpt: Checkpoint, plan: MergePlan, name: str, dtype: str, job: BlockJob, lib: Any) -> TensorMerge:
    """A LoRA target merged by the native kernel from the base file straight into the output file: blocks of
    rows are read, merged (every B·A element as torch computes it), rounded, measured and ``pwrite``-n while
    in cache. No whole tensor is held; the same bits as the torch paths."""
    info = ckpt.info(name)
    read, write = _block_io(ckpt, name, job.dest)
    factors = []
    for op in plan.targets[name]:
        weights = plan.adapters[op.adapter].weights
        factors.append(LoraFactors.of(weights.float32_array(op.tensors["lora_A"]),
                                      weights.float32_array(op.tensors["lora_B"]), op.scaling,
                                      fan_in_fan_out=op.fan_in_fan_out))
    stats = native_merge.stream_lora_merge(lib, info.shape, info.dtype, dtype, factors, read=read, write=write,
                                           workers=job.workers, chunk=job.chunk, pool=job.pool)
    check_finite(plan, name, dtype, stats)
    return tensor_entry(name, plan, dtype, stats, "native")


def stream_tensor(ckpt: Checkpoint, plan: MergePlan, name: str, dtype: str, job: BlockJob) -> TensorMerge:
    """An additive-only target the native kernel does not take (LoHa, LoKr, VeRA, ..., or no C compiler),
    merged chunk by chunk in torch from the base file straight into the output file: read a block of rows,
    add each ΔW block (a LoRA's B·A computed per row block), round, measure, and ``pwrite`` the block while
    it is still in cache. No whole tensor is held; same bits as the in-memory path."""
    import torch

    from surgeon.ops.lora import lora_delta_rows
    from surgeon.ops.merge_rounding import stream_merged
    from surgeon.workflows.merge.apply import additive_delta

    info = ckpt.info(name)
    read_bytes, write_bytes = _block_io(ckpt, name, job.dest)
    stored_dtype, out_dtype = info.torch_dtype, torch_dtype(dtype)
    in_size, out_size = stored_dtype.itemsize, out_dtype.itemsize
    cols = info.shape[-1] if len(info.shape) > 1 else 1
    cpu = torch.device("cpu")

    def read(i: int, n: int, buf: torch.Tensor) -> torch.Tensor:
        read_bytes(i * in_size, n * in_size, memoryview(buf.numpy()))
        return buf[: n * in_size].view(stored_dtype)

    def write(i: int, rounded: torch.Tensor) -> None:
        write_bytes(i * out_size, memoryview(rounded.view(torch.uint8).numpy()))

    def lora_rows(op: MergeOp) -> Callable[[int, int, torch.Tensor], torch.Tensor]:
        weights = plan.adapters[op.adapter].weights
        lora_A, lora_B = (weights.get(op.tensors[r], dtype=torch.float32) for r in ("lora_A", "lora_B"))
        return lambda i, n, buf: lora_delta_rows(lora_A, lora_B, op.scaling, slice(i // cols, (i + n) // cols),
                                                 fan_in_fan_out=op.fan_in_fan_out, out=buf)

    deltas = [lora_rows(op) if op.kind == "lora" and len(info.shape) == 2 else additive_delta(plan, op, info.shape, cpu)
              for op in plan.targets[name]]
    stats = stream_merged(info.shape, stored_dtype, out_dtype, read=read, deltas=deltas, write=write,
                          workers=job.workers, chunk=job.chunk, pool=job.pool)
    check_finite(plan, name, dtype, stats)
    return tensor_entry(name, plan, dtype, stats, "stream")
