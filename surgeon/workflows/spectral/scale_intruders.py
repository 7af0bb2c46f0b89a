"""`surgeon scale-intruders`: rescale intruder singular values and write the repaired model.

W' = W_t + (λ − 1)·Σ_{j∈I} σ_j u_j v_jᵀ over the intruders I of each matrix (found as in
`surgeon intruders`): each intruder's singular value becomes λσ_j and nothing else
changes. The edit is computed in float64 from the float64 triplets and rounded once to
the tensor's dtype. Tensors without intruders are copied byte for byte (when TUNED is
BASE + an adapter they are written as the merged weights, as `surgeon merge` would).

``as_adapter``: when TUNED is BASE + a LoRA, write a PEFT LoRA adapter instead whose merge
onto BASE gives the repaired weights: for each repaired module A' = [A; V_Iᵀ] and
B' = [B, (λ − 1)·U_IΣ_I / s] keep the module's scaling s, so s·B'A' = s·BA + (λ − 1)·U_IΣ_IV_Iᵀ
(the rank grows by |I|, recorded in rank_pattern/alpha_pattern).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from surgeon.errors import AdapterError, CheckpointFormatError, IncompatibleInputError, OptionError
from surgeon.io.adapter_writer import write_lora_adapter
from surgeon.io.format import torch_dtype
from surgeon.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec
from surgeon.ops import intruders as ops
from surgeon.ops.targets import DEFAULT_PRESET, Target
from surgeon.parallel.exchange import device_for
from surgeon.parallel.world import SOLO, World
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text, safetensors_metadata
from surgeon.workflows.spectral.intruders import (Analysis, Inputs, IntruderOptions, MatrixIntruders, analyse_stream,
                                         open_inputs, totals)
from surgeon.workflows.merge.run import merged_float32, pick_device
from surgeon.workflows.spectral.repair import IntruderChange, matrix_change, chosen_ranks, restricted, rounded, tuned_dense
from surgeon.workflows.spectral.spectrum import open_cache, resolve_targets


@dataclass(frozen=True)
class ScaleReport:
    tuned: str | None
    base: str
    adapter: str | None
    output: str
    as_adapter: bool
    lam: float
    epsilon: float
    top_k: int
    only_top: int | None
    changes: list[IntruderChange]
    unchanged: int
    totals: dict[str, Any]
    bytes_written: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _validate(lam: float, only_top: int | None) -> None:
    if not math.isfinite(lam) or lam < 0:
        raise OptionError(f"--lambda {lam}: give a finite scale ≥ 0 (0 removes the intruders, 1 changes nothing).")
    if only_top is not None and only_top < 1:
        raise OptionError(f"--only-top {only_top}: give at least 1 (the number of strongest intruders per matrix).")


def scale_intruders(
    tuned: str | os.PathLike[str] | None,
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    lam: float,
    adapter: str | os.PathLike[str] | None = None,
    targets: str = DEFAULT_PRESET,
    options: IntruderOptions = IntruderOptions(),
    only_top: int | None = None,
    as_adapter: bool = False,
    device: str = "auto",
    cache: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    only_ranks: Mapping[str, Sequence[int]] | None = None,
    world: World = SOLO,
) -> ScaleReport:
    """Write TUNED (or BASE + ``adapter``) with every intruder's σ_j scaled to λσ_j.

    ``only_ranks`` ({base tensor name: 1-based ranks}): rescale only those of each matrix's
    intruders (`--sequence-from`: the ones born at or after a stage); the report counts those."""
    options.check()
    _validate(lam, only_top)
    if as_adapter and world.distributed:
        raise OptionError("--as-adapter runs in one process (the adapter's factors are small); drop --nproc/torchrun "
                          "for it, or write the repaired model instead.")
    begin = time.perf_counter()
    dev = pick_device(device_for(world, device))
    store = open_cache(cache, enabled=use_cache)
    counts = {"hits": 0, "misses": 0, "computed": 0}
    with open_inputs(tuned, base, adapter) as inputs:
        if as_adapter:
            _check_as_adapter(inputs)
        by_host_name = _host_names(inputs, resolve_targets(inputs.base, targets, what=str(base)))
        order = {name: i for i, name in enumerate(inputs.host.keys())}
        chosen = [by_host_name[n] for n in sorted(by_host_name, key=order.__getitem__)]
        stream = analyse_stream(inputs, chosen, options, store, dev, counts, desc="scale-intruders")
        if only_ranks is not None:
            stream = restricted(stream, only_ranks)
        params = {"lambda": lam, "epsilon": options.epsilon, "top_k": options.top_k, "only_top": only_top,
                  "side": options.side, "targets": targets, "as_adapter": as_adapter,
                  **({"only_ranks": {k: list(v) for k, v in only_ranks.items()}} if only_ranks is not None else {})}
        record = provenance("scale-intruders", params, inputs={k: str(v) for k, v in (
            ("base", inputs.base_path), ("tuned", inputs.tuned_path), ("adapter", inputs.adapter_path)) if v})
        try:
            if world.distributed:
                from surgeon.workflows.spectral.scale_shared import write_model_shared

                rows, changes, written = write_model_shared(
                    world, inputs, by_host_name, chosen, options=options, store=store, device=dev, counts=counts,
                    out=out, lam=lam, only_top=only_top, record=record, max_shard_size=max_shard_size,
                    overwrite=overwrite, only_ranks=only_ranks)
            elif as_adapter:
                rows, changes, written = _write_adapter(inputs, stream, out, lam, only_top, record, overwrite)
            else:
                rows, changes, written = _write_model(inputs, by_host_name, stream, out, lam, only_top, record,
                                                      max_shard_size, overwrite)
        finally:
            stream.close()
        return ScaleReport(
            str(inputs.tuned_path) if inputs.tuned_path else None, str(base),
            str(inputs.adapter_path) if inputs.adapter_path else None, str(out), as_adapter, lam, options.epsilon,
            options.top_k, only_top, changes, sum(1 for r in rows if not chosen_ranks(r, only_top)), totals(rows),
            written, time.perf_counter() - begin,
        )


def _host_names(inputs: Inputs, targets: list[Target]) -> dict[str, Target]:
    """Targets keyed by their name in the checkpoint being rewritten (TUNED may prefix the base's names)."""
    if inputs.tuned is None:
        return {t.name: t for t in targets}
    out = {}
    for t in targets:
        name = inputs.tuned_name(t.name)
        if name is None:
            raise CheckpointFormatError(
                f"{inputs.tuned_path}: has no tensor {t.name!r}, which the base has; TUNED must be a fine-tune of "
                "BASE with the same tensor names. Check the two paths (or narrow --targets)."
            )
        out[name] = t
    return out


def _write_model(inputs: Inputs, targets: dict[str, Target], stream: Iterator[Analysis], out: str | os.PathLike[str],
                 lam: float, only_top: int | None, record: dict[str, Any], max_shard_size: int | str,
                 overwrite: bool) -> tuple[list[MatrixIntruders], list[IntruderChange], int]:
    host = inputs.host
    specs = [TensorSpec(n, info.dtype, info.shape) for n, info in host.tensors.items()]
    rows: list[MatrixIntruders] = []
    changes: list[IntruderChange] = []
    sources = [p for p in (inputs.base_path, inputs.tuned_path, inputs.adapter_path) if p is not None]
    with CheckpointWriter(out, specs, inputs=sources, max_shard_size=max_shard_size, overwrite=overwrite,
                          metadata=safetensors_metadata(record), extra_files=host.extra_files(),
                          extra_texts={PROVENANCE_FILE: ""}) as writer:
        for spec in specs:
            target = targets.get(spec.name)
            if target is not None:
                a = next(stream)
                rows.append(a.row)
                ranks = chosen_ranks(a.row, only_top) if lam != 1.0 else []
                if ranks:
                    entry, edit = matrix_change(a, ranks, lam, spec.dtype)
                    changes.append(entry)
                    writer.write(spec.name, rounded(tuned_dense(a) + edit, target, spec.dtype))
                    continue
            if inputs.plan is not None and spec.name in inputs.plan.targets:
                writer.write(spec.name, merged_float32(host, inputs.plan, spec.name).to(torch_dtype(spec.dtype)))
            else:
                writer.copy_from(host, spec.name)
        # the sidecars are written when the block ends: the record can carry every change
        writer.extra_texts[PROVENANCE_FILE] = provenance_file_text(record, {"changes": [asdict(c) for c in changes]})
    return rows, changes, sum(s.nbytes for s in specs)


# -- as an adapter ------------------------------------------------------------------------------
_KEPT_KINDS = ("lora", "lora_embedding", "replace")


def _check_as_adapter(inputs: Inputs) -> None:
    plan = inputs.plan
    if plan is None or inputs.tuned is not None or inputs.adapter is None:
        raise IncompatibleInputError("--as-adapter writes a LoRA adapter for BASE, so TUNED must be BASE + a LoRA adapter: "
                                     "give the adapter folder as TUNED (or --adapter) and no other checkpoint.")
    if inputs.adapter.config.peft_type != "LORA":
        raise AdapterError(f"{inputs.adapter_path}: --as-adapter needs a LoRA adapter, not "
                           f"{inputs.adapter.config.peft_type}; write the repaired model instead (drop --as-adapter).")
    for name, steps in plan.targets.items():
        for op in steps:
            if op.kind not in _KEPT_KINDS:
                raise AdapterError(
                    f"{inputs.adapter_path}: module {op.module!r} is {op.kind} (on {name!r}); --as-adapter extends "
                    "plain LoRA factors only. Write the repaired model instead (drop --as-adapter)."
                )


def _module_ops(inputs: Inputs) -> dict[str, Any]:
    """module path -> its MergeOp, for the LoRA modules of the adapter."""
    plan = inputs.plan
    assert plan is not None
    return {op.module: (name, op) for name, steps in plan.targets.items() for op in steps if op.kind != "replace"}


def _write_adapter(inputs: Inputs, stream: Iterator[Analysis], out: str | os.PathLike[str], lam: float,
                   only_top: int | None, record: dict[str, Any], overwrite: bool
                   ) -> tuple[list[MatrixIntruders], list[IntruderChange], int]:
    adapter, plan = inputs.adapter, inputs.plan
    assert adapter is not None and plan is not None
    rows: list[MatrixIntruders] = []
    edits: dict[str, Analysis] = {}
    changes: list[IntruderChange] = []
    for a in stream:  # the factors of an adapter are small: collect the edits, then write once
        rows.append(a.row)
        ranks = chosen_ranks(a.row, only_top) if lam != 1.0 else []
        if ranks:
            edits[a.row.name] = a
            changes.append(matrix_change(a, ranks, lam, "F32")[0])
    lora_modules = _module_ops(inputs)
    orphans = sorted(set(edits) - {name for name, _ in lora_modules.values()})
    if orphans:
        raise AdapterError(
            f"{inputs.adapter_path}: {orphans[0]!r} has intruders but the adapter replaces it whole (modules_to_save), "
            "so no LoRA factor can carry the repair; write the repaired model (drop --as-adapter) or leave it out "
            "of --targets."
        )
    modules, scaling, embeddings = {}, {}, []
    factor_dtype = "F32"
    for module, (name, op) in lora_modules.items():
        a_name = op.tensors.get("lora_A", op.tensors.get("lora_embedding_A"))
        b_name = op.tensors.get("lora_B", op.tensors.get("lora_embedding_B"))
        factor_dtype = adapter.weights.info(a_name).dtype
        a_mat = adapter.weights.get(a_name, dtype=torch.float64)
        b_mat = adapter.weights.get(b_name, dtype=torch.float64)
        if op.kind == "lora_embedding":
            embeddings.append(module)
        elif name in edits:
            an = edits[name]
            extra_a, extra_b = ops.intruder_factors(an.triplets.u.cpu(), an.triplets.s.cpu(), an.triplets.v.cpu(),
                                                    chosen_ranks(an.row, only_top), lam)
            a_mat, b_mat = torch.cat([a_mat, extra_a], 0), torch.cat([b_mat, extra_b / op.scaling], 1)
        modules[module] = (a_mat, b_mat)
        scaling[module] = op.scaling
    saved: dict[str, dict[str, Any]] = {}
    for steps in plan.targets.values():
        for op in steps:
            if op.kind == "replace":
                module, _, param = op.module.rpartition(".")
                saved.setdefault(module, {})[param] = (adapter.weights, op.tensors["tensor"])
    raw = adapter.config.raw
    written = write_lora_adapter(
        out, modules, base_model_name_or_path=raw.get("base_model_name_or_path"), scaling=scaling,
        embedding_modules=embeddings, modules_to_save=saved, fan_in_fan_out=bool(raw.get("fan_in_fan_out")),
        task_type=raw.get("task_type"), dtype=factor_dtype, record=record,
        report={"changes": [asdict(c) for c in changes]}, inputs=[p for p in (inputs.base_path, inputs.adapter_path)],
        overwrite=overwrite,
    )
    return rows, changes, written.bytes
