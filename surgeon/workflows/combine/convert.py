"""One adapter of any mergeable type to a LoRA of a chosen rank: peft's ``convert_to_lora``, streamed.

ΔW of each module (LoRA factors alone, or for other types the merge plan's ΔW on ``--base``) is
factored by SVD: B = U_k·diag(S_k), A = V_kᴴ, with k an int rank or the smallest rank holding an
energy fraction of Σσ². As in peft the scaling is baked into the factors (r = lora_alpha = k), and
modules whose k differs from the config's r go to rank_pattern/alpha_pattern.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from surgeon.errors import OptionError, UnsupportedAdapterError
from surgeon.io.adapter import Adapter, adapter_layout
from surgeon.io.adapter_writer import write_lora_adapter
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.resolve import resolve_path
from surgeon.ops.combine import lora_from_delta
from surgeon.progress import progress
from surgeon.provenance import provenance
from surgeon.workflows.combine.plan import CombineOptions, CombineReport, check_combinable, module_scaling
from surgeon.workflows.merge.apply import additive_delta, merge_one
from surgeon.workflows.merge.plan import plan_adapter_merge

_ADDITIVE = {"lora", "lora_embedding", "adalora", "loha", "lokr", "vera"}
_CONVERTIBLE = _ADDITIVE | {"dora", "dora_embedding", "ia3", "hira", "hira_embedding"}


@dataclass(frozen=True)
class ModuleDelta:
    """ΔW of one module in LoRA orientation: (out × in) for a Linear/Conv1D, (dim × num_embeddings) for an
    embedding (so that ΔW = B·A with A (k × in) and B (out × k))."""

    path: str
    embedding: bool
    fan_in_fan_out: bool
    delta: torch.Tensor


def _lora_deltas(adapter: Adapter, weight: float) -> Iterator[ModuleDelta]:
    """From the LoRA factors alone: w·s·B·A per module."""
    check_combinable(adapter)
    for path, module in sorted(adapter_layout(adapter.weights).modules.items()):
        emb = "lora_embedding_A" in module.tensors
        a_name, b_name = (module.tensors["lora_embedding_A"], module.tensors["lora_embedding_B"]) if emb else \
            (module.tensors["lora_A"], module.tensors["lora_B"])
        lora_A = adapter.weights.get(a_name, dtype=torch.float32)
        lora_B = adapter.weights.get(b_name, dtype=torch.float32)
        scale = weight * module_scaling(adapter, path, lora_A.shape[0])
        yield ModuleDelta(path, emb, bool(adapter.config.raw.get("fan_in_fan_out")), (lora_B @ lora_A) * scale)


def _planned_deltas(adapter: Adapter, weight: float, base: Checkpoint) -> Iterator[ModuleDelta]:
    """From the merge plan on the base: ΔW of the additive kinds directly, W' − W for the others."""
    plan = plan_adapter_merge(base, [(adapter, weight)])
    device = torch.device("cpu")
    for name, ops in plan.targets.items():
        kinds = {op.kind for op in ops}
        if not kinds <= _CONVERTIBLE:
            bad = sorted(kinds - _CONVERTIBLE)[0]
            raise UnsupportedAdapterError(
                f"{adapter.folder}: {name!r} is changed by {bad!r} (a bias or a whole saved tensor), which a LoRA "
                "cannot express; peft's convert_to_lora refuses it too. Merge the adapter with surgeon merge instead.")
        op = ops[0]
        shape = base.info(name).shape
        if len(shape) != 2:
            raise UnsupportedAdapterError(f"{adapter.folder}: {name!r} is {list(shape)}; only 2-D (Linear, Conv1D, "
                                          "Embedding) modules convert to LoRA.")
        if len(ops) == 1 and op.kind in _ADDITIVE:
            delta = additive_delta(plan, op, torch.Size(shape), device)
            delta = delta[0] * delta[1] if isinstance(delta, tuple) else delta
        else:
            merged, stored = merge_one(base, plan, name, device)
            delta = merged - stored.float()
        emb = op.kind.endswith("embedding")
        oriented = delta.T if (op.fan_in_fan_out or emb) else delta
        yield ModuleDelta(op.module, emb, op.fan_in_fan_out, oriented.contiguous())


def convert_adapter(adapter: Adapter, weight: float, out: str | os.PathLike[str], *, options: CombineOptions,
                    base: str | os.PathLike[str] | None, overwrite: bool, arg: str) -> CombineReport:
    """Write ``weight``·ΔW of ``adapter`` as a LoRA of rank ``options.svd_rank`` (int or energy fraction)."""
    rank = options.svd_rank if options.svd_rank is not None else int(adapter.config.r or 8)
    plain_lora = adapter.config.peft_type == "LORA" and not adapter.config.raw.get("use_dora")
    if not plain_lora and base is None:
        raise OptionError(f"{adapter.folder}: converting a {adapter.config.peft_type} adapter to LoRA needs the base "
                          "model its ΔW acts on; add --base BASE.")
    with Checkpoint.open(resolve_path(base)) if base is not None and not plain_lora else nullcontext() as b_ckpt:
        deltas = _lora_deltas(adapter, weight) if plain_lora else _planned_deltas(adapter, weight, b_ckpt)
        modules, ranks, embeddings, conv1d = {}, {}, set(), False
        for md in progress(list(deltas), desc="convert to LoRA"):
            lora_A, lora_B, k = lora_from_delta(md.delta, rank)
            modules[md.path] = (lora_A, lora_B)
            ranks[md.path] = k
            conv1d = conv1d or md.fan_in_fan_out
            if md.embedding:
                embeddings.add(md.path)
    if not modules:
        raise UnsupportedAdapterError(f"{adapter.folder}: no module to convert.")
    params = {**options.parameters(), "combination": "convert_to_lora", "adapters": [{"path": arg, "weight": weight}]}
    record = provenance("combine", params, inputs={"adapter_0": arg, **({"base": str(base)} if base else {})})
    st = options.dtype or "F32"
    written = write_lora_adapter(out, modules, base_model_name_or_path=adapter.config.base_model,
                                 alpha={p: float(k) for p, k in ranks.items()}, embedding_modules=embeddings,
                                 fan_in_fan_out=conv1d, task_type=adapter.config.raw.get("task_type"), dtype=st,
                                 record=record, inputs=[adapter.folder], overwrite=overwrite)
    return CombineReport(output=str(out), method=options.method, combination="convert_to_lora",
                         adapters=[{"path": arg, "weight": weight}], r=written.r, lora_alpha=written.lora_alpha,
                         modules=len(modules), parameters=params, bytes_written=written.bytes,
                         ranks=dict(written.rank_pattern))

