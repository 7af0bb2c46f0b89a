"""`surgeon scale-intruders` on a process group: each rank repairs its share of the matrices (by SVD
cost) and copies its share of the untouched tensors (by size) straight into the shared output;
rank 0 records every change and publishes. The output equals a one-process run's."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from surgeon.io.format import torch_dtype
from surgeon.io.shared_output import RankShards
from surgeon.io.svd_cache import SvdCache
from surgeon.io.writer import CheckpointWriter, TensorSpec, copy_span, pwrite_all, tensor_bytes
from surgeon.ops.targets import Target
from surgeon.parallel.exchange import plan_share, run_share
from surgeon.parallel.share import svd_cost
from surgeon.parallel.world import World
from surgeon.provenance import PROVENANCE_FILE, provenance_file_text, safetensors_metadata
from surgeon.workflows.merge.run import merged_float32
from surgeon.workflows.shared_write import owners_by_bytes, write_shared
from surgeon.workflows.spectral.intruders import Inputs, IntruderOptions, MatrixIntruders, analyse_stream
from surgeon.workflows.spectral.repair import IntruderChange, matrix_change, chosen_ranks, restricted, rounded, tuned_dense
from surgeon.workflows.spectral.results import row_from_wire, row_to_wire


def write_model_shared(world: World, inputs: Inputs, targets: dict[str, Target], chosen: Sequence[Target], *,
                       options: IntruderOptions, store: SvdCache, device: torch.device, counts: dict[str, int],
                       out: str | os.PathLike[str], lam: float, only_top: int | None, record: dict[str, Any],
                       max_shard_size: int | str, overwrite: bool,
                       only_ranks: Mapping[str, Sequence[int]] | None) -> tuple[list[MatrixIntruders], list[Any], int]:
    """The distributed twin of ``scale_intruders._write_model`` (same arithmetic, same bytes)."""
    host = inputs.host
    specs = [TensorSpec(n, info.dtype, info.shape) for n, info in host.tensors.items()]
    part = plan_share(world, [svd_cost(*t.linear_shape) for t in chosen])
    name_of = {t.name: host_name for host_name, t in targets.items()}
    rest = [s.name for s in specs if s.name not in targets]
    copier = owners_by_bytes(rest, lambda n: host.info(n).nbytes, world.size)
    sources = [p for p in (inputs.base_path, inputs.tuned_path, inputs.adapter_path) if p is not None]

    def fill(shards: RankShards) -> None:
        mine = [chosen[i] for i in part.mine]
        stream = analyse_stream(inputs, mine, options, store, device, counts, desc="scale-intruders")
        if only_ranks is not None:
            stream = restricted(stream, only_ranks)
        run_share(part, [t.name for t in mine],
                  (_repair(a, inputs, name_of, targets, shards, lam, only_top) for a in stream))
        if part.failure is None:
            for name in (n for n in rest if copier[n] == world.rank):
                _put(inputs, name, shards, None)

    def open_writer() -> CheckpointWriter:
        return CheckpointWriter(out, specs, inputs=sources, max_shard_size=max_shard_size, overwrite=overwrite,
                                metadata=safetensors_metadata(record), extra_files=host.extra_files(),
                                extra_texts={PROVENANCE_FILE: ""})

    def finish(writer: CheckpointWriter, results: list[Any]) -> None:
        changes = [c for _, c in results if c is not None]
        writer.extra_texts[PROVENANCE_FILE] = provenance_file_text(record, {"changes": [asdict(c) for c in changes]})

    results = write_shared(world, part, open_writer=open_writer, fill=fill, finish=finish, encode=_encode,
                           decode=_decode)
    return [row for row, _ in results], [c for _, c in results if c is not None], sum(s.nbytes for s in specs)


def _repair(a: Any, inputs: Inputs, name_of: dict[str, str], targets: dict[str, Target], shards: RankShards,
            lam: float, only_top: int | None) -> tuple[MatrixIntruders, Any]:
    """Write one analysed matrix into its place, as ``_write_model`` would; its row and change."""
    host_name = name_of[a.row.name]
    dtype = inputs.host.info(host_name).dtype
    ranks = chosen_ranks(a.row, only_top) if lam != 1.0 else []
    if ranks:
        entry, edit = matrix_change(a, ranks, lam, dtype)
        _put(inputs, host_name, shards, rounded(tuned_dense(a) + edit, targets[host_name], dtype))
        return a.row, entry
    _put(inputs, host_name, shards, None)
    return a.row, None


def _put(inputs: Inputs, name: str, shards: RankShards, tensor: torch.Tensor | None) -> None:
    """``tensor`` into its place; None: the tensor as TUNED has it (merged when TUNED is BASE + adapter)."""
    fd, offset = shards.place(name)
    host = inputs.host
    if tensor is None and inputs.plan is not None and name in inputs.plan.targets:
        tensor = merged_float32(host, inputs.plan, name).to(torch_dtype(host.info(name).dtype))
    if tensor is None:
        copy_span(host, name, fd, offset)
    else:
        pwrite_all(fd, tensor_bytes(tensor), offset)


def _encode(result: tuple[MatrixIntruders, Any]) -> dict[str, Any]:
    row, change = result
    return {"row": row_to_wire(row), "change": None if change is None else asdict(change)}


def _decode(data: dict[str, Any]) -> tuple[MatrixIntruders, Any]:
    change = data["change"]
    return row_from_wire(data["row"]), None if change is None else IntruderChange(**change)
