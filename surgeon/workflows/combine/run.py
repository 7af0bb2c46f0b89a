"""`surgeon combine`: one LoRA adapter from several, with peft's ``add_weighted_adapter`` semantics.

Module by module: each output module reads only its inputs' factors, computes in float32 with
:mod:`surgeon.ops.combine` and is written before the next is read (peak memory: one module's
factors and, for the ``_svd`` types, its ΔW). One adapter with ``--method svd`` is converted to a
LoRA of the asked rank instead (:mod:`surgeon.workflows.combine.convert`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any
from contextlib import ExitStack
from pathlib import Path

import torch

from surgeon.errors import OptionError
from surgeon.io.adapter import ADAPTER_CONFIG, Adapter
from surgeon.io.finite_inputs import refuse_non_finite_adapter
from surgeon.io.format import torch_dtype
from surgeon.io.shared_output import RankShards
from surgeon.io.writer import CheckpointWriter, TensorSpec
from surgeon.ops.combine import lowrank_svd_factors, peft_combine, svd_factors
from surgeon.ops.counter_rng import stream_key
from surgeon.parallel.exchange import plan_share, run_share
from surgeon.parallel.share import svd_cost
from surgeon.parallel.world import SOLO, World
from surgeon.progress import progress
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text, safetensors_metadata
from surgeon.workflows.combine.convert import convert_adapter
from surgeon.workflows.combine.plan import (
    EQUAL_RANK,
    CombineOptions,
    CombinePlan,
    CombineReport,
    ModuleJob,
    check_options,
    plan_combine,
)
from surgeon.workflows.shared_write import write_shared
from surgeon.workflows.taskvec.apply import TaskArg, parse_task

_ONE_FILE = 1 << 62  # an adapter stays one file, as peft saves it


def combine_adapters(
    adapters: Sequence[TaskArg],
    out: str | os.PathLike[str],
    *,
    options: CombineOptions | None = None,
    base: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    world: World = SOLO,
) -> CombineReport:
    """Write the combination of ``adapters`` ('ADAPTER[:w]' strings or (path, w) pairs) to ``out``.

    ``base`` is needed only to convert a non-LoRA adapter (its ΔW needs the module shapes).
    """
    options = options or CombineOptions()
    parsed = [parse_task(a) for a in adapters]
    if not parsed:
        raise OptionError("no adapters given; pass at least one ADAPTER[:W] folder.")
    check_options(options, len(parsed))
    with ExitStack() as stack:
        opened = [(stack.enter_context(Adapter.open(p)), w) for p, w in parsed]
        for adapter, _ in opened:  # a NaN factor: one line naming it, not an SVD that fails to converge
            refuse_non_finite_adapter(adapter.weights)
        if len(opened) == 1 and options.method == "svd":
            if world.distributed:
                raise OptionError("converting one adapter (--method svd with one ADAPTER) runs in one process; "
                                  "drop --nproc/torchrun for it.")
            return convert_adapter(opened[0][0], opened[0][1], out, options=options, base=base, overwrite=overwrite,
                                   arg=parsed[0][0])
        plan = plan_combine(opened, options)
        return _write(plan, opened, parsed, out, options, overwrite, world)


def _write(plan: CombinePlan, opened: list[tuple[Adapter, float]], parsed: list[tuple[str, float]],
           out: str | os.PathLike[str], options: CombineOptions, overwrite: bool, world: World = SOLO) -> CombineReport:
    st = options.dtype or opened[0][0].weights.info(plan.modules[0].members[0].lora_A).dtype
    specs = []
    for job in plan.modules:
        a_key, b_key = job.keys
        specs += [TensorSpec(a_key, st, (job.rank, job.features[1])), TensorSpec(b_key, st, (job.features[0], job.rank))]
    for idx, name in plan.carried:
        info = opened[idx][0].weights.info(name)
        specs.append(TensorSpec(name, info.dtype, info.shape))
    params = {**options.parameters(), "combination": plan.method,
              "adapters": [{"path": p, "weight": w} for p, w in parsed], "dtype": st}
    record = provenance("combine", params, inputs={f"adapter_{i}": p for i, (p, _) in enumerate(parsed)})
    texts = {ADAPTER_CONFIG: json.dumps(plan.config, indent=2) + "\n", PROVENANCE_FILE: provenance_file_text(record)}
    def open_writer() -> CheckpointWriter:
        return CheckpointWriter(out, specs, inputs=[a.folder for a, _ in opened], max_shard_size=_ONE_FILE,
                                metadata=safetensors_metadata(record), extra_texts=texts, overwrite=overwrite,
                                prefix="adapter_model")

    def write_module(writer: CheckpointWriter | RankShards, job: ModuleJob) -> None:
        lora_A, lora_B = combine_module(job, plan.method, opened, options)
        writer.write(job.keys[0], lora_A.to(torch_dtype(st)).contiguous())
        writer.write(job.keys[1], lora_B.to(torch_dtype(st)).contiguous())

    if world.distributed:  # modules shared by cost (an SVD for the _svd types), carried tensors by size
        items: list[Any] = [*plan.modules, *plan.carried]
        costs = [svd_cost(*job.features) if plan.method.endswith("svd") else float(job.features[0] * job.features[1])
                 for job in plan.modules] + [float(opened[i][0].weights.info(n).nbytes) for i, n in plan.carried]
        part = plan_share(world, costs)

        def fill(shards: RankShards) -> None:
            def one(item: Any) -> None:
                if isinstance(item, ModuleJob):
                    write_module(shards, item)
                else:
                    shards.copy_from(opened[item[0]][0].weights, item[1])
            names = [items[i].keys[0] if isinstance(items[i], ModuleJob) else items[i][1] for i in part.mine]
            run_share(part, names, (one(items[i]) for i in part.mine))

        write_shared(world, part, open_writer=open_writer, fill=fill, finish=lambda writer, got: None,
                     encode=lambda r: None, decode=lambda r: None)
    else:
        with open_writer() as writer:
            for job in progress(plan.modules, total=len(plan.modules), desc=f"combine {plan.method}"):
                write_module(writer, job)
            for idx, name in plan.carried:
                writer.copy_from(opened[idx][0].weights, name)
    return CombineReport(
        output=str(out), method=options.method, combination=plan.method,
        adapters=[{"path": p, "weight": w} for p, w in parsed], r=plan.new_rank, lora_alpha=float(plan.new_rank),
        modules=len(plan.modules), parameters=params, bytes_written=sum(s.nbytes for s in specs),
        ranks=dict(plan.config.get("rank_pattern") or {}),
    )


@torch.no_grad()
def combine_module(job: ModuleJob, method: str, adapters: Sequence[tuple[Adapter, float]],
                   options: CombineOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one output module, float32, shapes (job.rank × in) and (out × job.rank)."""
    factors = [(adapters[m.adapter][0].weights.get(m.lora_A, dtype=torch.float32),
                adapters[m.adapter][0].weights.get(m.lora_B, dtype=torch.float32)) for m in job.members]
    density = options.density if options.density is not None else 1.0
    out_features, in_features = job.features
    if method == "cat":
        lora_A = torch.zeros(job.rank, in_features)
        lora_B = torch.zeros(out_features, job.rank)
        cat_A = torch.cat([a * m.weight * m.scaling for (a, _), m in zip(factors, job.members)], dim=0)
        cat_B = torch.cat([b for _, b in factors], dim=1)
        lora_A[: cat_A.shape[0]] = cat_A
        lora_B[:, : cat_B.shape[1]] = cat_B
        return lora_A, lora_B
    if method in EQUAL_RANK:
        signed = [m.weight * m.scaling for m in job.members]
        weights_A = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in signed]  # the sign on A only
        weights_B = [math.sqrt(abs(x)) for x in signed]
        lora_A = peft_combine([a for a, _ in factors], weights_A, method, density=density,
                              majority_sign=options.majority_sign, key_of=_keys(options, job, "lora_A"))
        lora_B = peft_combine([b for _, b in factors], weights_B, method, density=density,
                              majority_sign=options.majority_sign, key_of=_keys(options, job, "lora_B"))
        return lora_A, lora_B
    if method == "svd" and options.svd_clamp is None:  # ΔW = Σ w·s·B·A has rank ≤ Σr: factor it without forming it
        stacked_A = torch.cat([a * (m.weight * m.scaling) for (a, _), m in zip(factors, job.members)], dim=0)
        lora_A, lora_B = lowrank_svd_factors(torch.cat([b for _, b in factors], dim=1), stacked_A, job.rank)
        return _pad(lora_A, lora_B, job.rank)
    inner = "linear" if method == "svd" else method[: -len("_svd")]
    # ΔW in the layout of peft's get_delta_weight, which the pruning flattens (the order decides which tied
    # magnitudes torch.topk keeps): transposed for embeddings and fan_in_fan_out layers; B·A for the SVD
    first = adapters[job.members[0].adapter][0]
    flip = job.embedding or bool(first.config.raw.get("fan_in_fan_out"))
    deltas = [((b @ a).T if flip else b @ a) * m.scaling for (a, b), m in zip(factors, job.members)]
    delta = peft_combine(deltas, [m.weight for m in job.members], inner, density=density,
                         majority_sign=options.majority_sign, key_of=_keys(options, job, "delta"))
    delta = delta.T if flip else delta
    lora_A, lora_B = svd_factors(delta, job.rank, clamp=options.svd_clamp)
    return _pad(lora_A, lora_B, job.rank)


def _keys(options: CombineOptions, job: ModuleJob, role: str):  # type: ignore[no-untyped-def]
    """The DARE stream of each member: keyed by seed, module, factor and the adapter's position."""
    return lambda i: stream_key(options.seed, job.path, role, job.members[i].adapter)


def _pad(lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows/columns up to ``rank`` when the matrix has fewer singular values than the rank asked."""
    if lora_A.shape[0] == rank:
        return lora_A, lora_B
    A = torch.zeros(rank, lora_A.shape[1])
    B = torch.zeros(lora_B.shape[0], rank)
    A[: lora_A.shape[0]] = lora_A
    B[:, : lora_B.shape[1]] = lora_B
    return A, B


def describe(report: CombineReport) -> str:
    return " ".join(f"{'+' if a['weight'] >= 0 else '−'}{abs(a['weight']):g}·{Path(a['path']).name}"
                    for a in report.adapters)
