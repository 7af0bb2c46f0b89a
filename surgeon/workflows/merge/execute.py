"""Executing a merge's :class:`RoutePlan`: every tensor written in order, by its planned route.

Streamed targets (native, stream) go block by block from the base file to the output file; the
in-memory ones are merged whole, with reading the next one and writing the previous output
overlapping the arithmetic (one reader and one writer thread) and memory reused rather than
page-faulted anew for every tensor. torch is imported only if some tensor needs it. The block
loops run on their own threads, with torch single-threaded meanwhile (no per-chunk barrier,
which costs dearly on a busy machine); whole-tensor products keep torch's default threads, as
peft's. :func:`quiet_runtime` holds the garbage collector off and restores it afterwards.
"""

from __future__ import annotations

import gc
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import pread_into, torch_dtype
from surgeon.io.writer import CheckpointWriter, copy_span, pwrite_all
from surgeon.progress import progress
from surgeon.workflows.merge.plan import MergePlan
from surgeon.workflows.merge.routes import RoutePlan
from surgeon.workflows.merge.modules import ModuleMerges
from surgeon.workflows.merge.stream import BlockJob, TensorMerge, memory_tensor, native_tensor, stream_tensor

if TYPE_CHECKING:
    import torch


class _Buffers:
    """Reused memory for the in-memory route: two read buffers (one being prefetched) and a ring of output
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


@contextmanager
def quiet_runtime() -> Iterator[None]:
    """No garbage collections (the loop makes few objects) for the duration of the block only: restored on
    the way out, error or not. torch keeps its thread count: whole-tensor products are computed as peft
    computes them (on torch's default threads); the block loops go single-threaded only while they run
    (:mod:`surgeon.ops.merge_rounding`)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def read_ahead(ckpt: Checkpoint, plan: MergePlan, name: str) -> None:
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


def _pwrite_tensor(fd: int, offset: int, tensor: torch.Tensor) -> None:
    import torch

    pwrite_all(fd, memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()), offset)


class _Run:
    """The state of one execution: thread pools, pending writes, prefetched reads."""

    def __init__(self, ckpt: Checkpoint, plan: MergePlan, routes: RoutePlan, writer: CheckpointWriter,
                 pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor, ThreadPoolExecutor]) -> None:
        self.ckpt, self.plan, self.routes, self.writer = ckpt, plan, routes, writer
        self.reader, self.io, self.pool = pools
        self.targets = [t.name for t in routes.tensors if t.action in ("merge", "replace")]
        self.order = {n: i for i, n in enumerate(self.targets)}
        self.in_memory = routes.names("memory")
        self.position = {n: i for i, n in enumerate(self.in_memory)}
        self.buffers = _Buffers() if self.in_memory else None
        self.ahead = {n: self.reader.submit(self.buffers.read, ckpt, n, 0) for n in self.in_memory[:1]}
        self.pending: deque[Future[None]] = deque()
        self.copies: list[Future[None]] = []
        self.entries: list[TensorMerge] = []
        self.modules = ModuleMerges(ckpt, plan, routes)

    def streamed(self, name: str, route: str, dtype: str) -> None:
        while self.pending:  # the writer is strictly ordered: everything before this tensor first
            self.pending.popleft().result()
        upcoming = self.targets[self.order[name] + 1 : self.order[name] + 2]
        if upcoming:  # let the kernel read the next target ahead while this one is computed
            read_ahead(self.ckpt, self.plan, upcoming[0])
        job = BlockJob(self.writer.reserve(name), self.routes.workers, self.routes.chunk, self.pool)
        if route == "native":
            self.entries.append(native_tensor(self.ckpt, self.plan, name, dtype, job, self.routes.kernel))
        else:
            self.entries.append(stream_tensor(self.ckpt, self.plan, name, dtype, job))

    def whole(self, name: str, dtype: str) -> Future[None]:
        import torch

        k, info = self.position[name], self.ckpt.info(name)
        stored = self.ahead.pop(name).result()
        self.ahead.update({n: self.reader.submit(self.buffers.read, self.ckpt, n, (k + 1) % 2)
                           for n in self.in_memory[k + 1 : k + 2]})
        slot = k % len(self.buffers.outs)
        out = self.buffers.out(slot, info.numel, torch_dtype(dtype))
        tensor, entry = memory_tensor(self.plan, name, dtype, torch.device(self.routes.device), stored,
                                      workers=self.routes.workers, scratch=self.buffers.scratch, out=out)
        future = self.io.submit(self.writer.write, name, tensor)
        self.buffers.written(slot, future)
        self.entries.append(entry)
        return future

    def cast(self, name: str, dtype: str) -> Future[None]:
        info = self.ckpt.info(name)
        self.entries.append(TensorMerge(name, "cast only", "", dtype, info.numel, 0, 0.0, 0.0, route="cast"))
        return self.io.submit(self.writer.write, name, self.ckpt.get(name).to(torch_dtype(dtype)))

    def tensor(self, name: str, route: str, dtype: str) -> None:
        if route == "copy" and self.routes.positional:
            self.copies.append(self.io.submit(copy_span, self.ckpt, name, *self.writer.reserve(name)))
            return
        if route in ("native", "stream"):
            self.streamed(name, route, dtype)
            return
        if route == "module" and self.routes.positional:  # into its reserved place, while the next is computed
            tensor = self.modules.tensor(name, dtype, self.entries)
            self.copies.append(self.io.submit(_pwrite_tensor, *self.writer.reserve(name), tensor))
            return
        if route == "memory":
            future = self.whole(name, dtype)
        elif route == "module":
            future = self.io.submit(self.writer.write, name, self.modules.tensor(name, dtype, self.entries))
        elif route == "cast":
            future = self.cast(name, dtype)
        else:
            future = self.io.submit(self.writer.copy_from, self.ckpt, name)
        self.pending.append(future)
        while len(self.pending) > 2:
            self.pending.popleft().result()

    def finish(self) -> None:
        while self.pending:
            self.pending.popleft().result()
        for future in self.copies:
            future.result()


def execute(ckpt: Checkpoint, plan: MergePlan, routes: RoutePlan, writer: CheckpointWriter) -> list[TensorMerge]:
    """Write every tensor of ``ckpt`` in order through ``writer`` by its route in ``routes``; the entries of
    the tensors written other than by copying."""
    for header in ckpt.headers:  # open every shard before threads share the checkpoint
        if header.tensors:
            ckpt.fd_and_span(next(iter(header.tensors)))
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as io, ThreadPoolExecutor(routes.workers) as pool, \
            quiet_runtime():
        run = _Run(ckpt, plan, routes, writer, (reader, io, pool))
        if run.targets:
            read_ahead(ckpt, plan, run.targets[0])
        for step in progress(routes.tensors, total=len(routes.tensors), desc="merge"):
            run.tensor(step.name, step.route, step.dtype)
        run.finish()
    return run.entries
