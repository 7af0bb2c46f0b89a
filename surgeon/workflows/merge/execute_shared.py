"""`surgeon merge` on a process group: each rank merges (or copies) its share of the tensors, by bytes
out, straight into its place in the shared output with positional writes; rank 0 publishes. Every
route computes exactly what it computes in one process, so the output is byte-identical."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from surgeon.io.checkpoint import Checkpoint
from surgeon.io.shared_output import RankShards
from surgeon.io.writer import CheckpointWriter, copy_span, pwrite_all
from surgeon.parallel.exchange import Share, plan_share, run_share
from surgeon.parallel.world import World
from surgeon.progress import progress
from surgeon.workflows.merge.execute import quiet_runtime
from surgeon.workflows.merge.modules import ModuleMerges
from surgeon.workflows.merge.plan import MergePlan
from surgeon.workflows.merge.routes import RoutePlan, TensorRoute
from surgeon.workflows.merge.stream import BlockJob, TensorMerge, memory_tensor, native_tensor, stream_tensor
from surgeon.workflows.shared_write import write_shared


def _pwrite_tensor(fd: int, offset: int, tensor: Any) -> None:
    import torch

    pwrite_all(fd, memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()), offset)


def _one(ckpt: Checkpoint, plan: MergePlan, routes: RoutePlan, step: TensorRoute, shards: RankShards,
         pool: ThreadPoolExecutor, modules: ModuleMerges) -> TensorMerge | None:
    """Write one tensor by its route into its place; its entry (None for a byte copy)."""
    fd, offset = shards.place(step.name)
    name, route, dtype = step.name, step.route, step.dtype
    if route == "copy":
        copy_span(ckpt, name, fd, offset)
        return None
    if route in ("native", "stream"):
        job = BlockJob((fd, offset), routes.workers, routes.chunk, pool)
        if route == "native":
            return native_tensor(ckpt, plan, name, dtype, job, routes.kernel)
        return stream_tensor(ckpt, plan, name, dtype, job)
    import torch

    from surgeon.io.format import torch_dtype

    if route == "cast":
        _pwrite_tensor(fd, offset, ckpt.get(name).to(torch_dtype(dtype)))
        return TensorMerge(name, "cast only", "", dtype, ckpt.info(name).numel, 0, 0.0, 0.0, route="cast")
    if route == "module":
        entries: list[TensorMerge] = []
        _pwrite_tensor(fd, offset, modules.tensor(name, dtype, entries))
        return entries[-1] if entries else None
    tensor, entry = memory_tensor(plan, name, dtype, torch.device(routes.device), ckpt.get(name),
                                  workers=routes.workers)
    _pwrite_tensor(fd, offset, tensor)
    return entry


def execute_shared(world: World, ckpt: Checkpoint, plan: MergePlan, routes: RoutePlan, *,
                   open_writer: Any, finish: Any) -> list[TensorMerge]:
    """Every rank writes its share of ``routes.tensors``; the entries of all of them, in plan order."""
    part: Share = plan_share(world, [float(max(t.nbytes, 1)) for t in routes.tensors])
    mine = [routes.tensors[i] for i in part.mine]

    def fill(shards: RankShards) -> None:
        with ThreadPoolExecutor(routes.workers) as pool, quiet_runtime():
            modules = ModuleMerges(ckpt, plan, routes)
            run_share(part, [t.name for t in mine],
                      (_one(ckpt, plan, routes, step, shards, pool, modules)
                       for step in progress(mine, total=len(mine), desc="merge")))

    results = write_shared(world, part, open_writer=open_writer, fill=fill,
                           finish=lambda writer, got: finish(writer, [e for e in got if e is not None]),
                           encode=lambda e: None if e is None else asdict(e),
                           decode=lambda d: None if d is None else TensorMerge(**d))
    return [e for e in results if e is not None]


__all__ = ["CheckpointWriter", "execute_shared"]
