"""Write a PEFT LoRA adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys follow peft's ``save_pretrained``:

* Linear / Conv1D module ``m``: ``base_model.model.<m>.lora_A.weight`` (r × in) and
  ``base_model.model.<m>.lora_B.weight`` (out × r); ΔW = (α/r)·B·A (transposed by peft
  for a GPT-2 Conv1D, whose stored weight is in × out).
* Embedding module ``m``: ``base_model.model.<m>.lora_embedding_A`` (r × num_embeddings)
  and ``..._B`` (embedding_dim × r); ΔW = (α/r)·(B·A)ᵀ.
* ``modules_to_save`` module ``m``: its parameters stored whole as ``base_model.model.<m>.<param>``.

Per-module ranks and alphas go to ``rank_pattern`` / ``alpha_pattern`` (full module
names, which peft matches as ``(.*\\.)?(name)$``); ``r`` / ``lora_alpha`` are the most
common values. The adapter is written through :class:`CheckpointWriter`, so it is
crash-safe and records its provenance.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import torch

from surgeon.errors import AdapterError
from surgeon.io.adapter import ADAPTER_CONFIG
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import DTYPE_ALIASES, st_dtype, torch_dtype
from surgeon.io.writer import CheckpointWriter, TensorSpec
from surgeon.provenance import (
    PROVENANCE_FILE,
    provenance_file_text,
    safetensors_metadata,
)

PEFT_PREFIX = "base_model.model."
# A modules_to_save parameter: a tensor, or (checkpoint, tensor name) to copy byte for byte.
SavedTensor = Union[torch.Tensor, tuple[Checkpoint, str]]
_ONE_FILE = 1 << 62  # shard budget that keeps the adapter in one file


@dataclass(frozen=True)
class AdapterWritten:
    """What :func:`write_lora_adapter` wrote."""

    path: str
    r: int
    lora_alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str]
    modules_to_save: list[str]
    parameters: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _most_common(values: Iterable[Any]) -> Any:
    counts = Counter(values)
    top = max(counts.values())
    return max(v for v, c in counts.items() if c == top)


def _alphas(
    ranks: Mapping[str, int], alpha: float | Mapping[str, float] | None, scaling: float | Mapping[str, float] | None
) -> dict[str, float]:
    """Per-module alpha: given, or scaling·r, or r (scaling 1) by default."""
    if alpha is not None and scaling is not None:
        raise ValueError("give alpha or scaling, not both")
    out = {}
    for name, r in ranks.items():
        if alpha is not None:
            out[name] = float(alpha[name] if isinstance(alpha, Mapping) else alpha)
        elif scaling is not None:
            out[name] = float(scaling[name] if isinstance(scaling, Mapping) else scaling) * r
        else:
            out[name] = float(r)
    return out


def _check_factors(name: str, a: torch.Tensor, b: torch.Tensor) -> int:
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
        raise AdapterError(
            f"LoRA module {name!r}: A is {list(a.shape)} and B is {list(b.shape)}; expected A (r × in) and "
            "B (out × r) with the same r ≥ 1. Pass the factors in that order."
        )
    return int(a.shape[0])


def lora_config_dict(
    *,
    base_model_name_or_path: str | None,
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    modules_to_save: Collection[str],
    fan_in_fan_out: bool = False,
    task_type: str | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` body for a plain LoRA with these per-module ranks/alphas."""
    r = int(_most_common(ranks.values())) if ranks else 8
    lora_alpha = float(_most_common(alphas.values())) if alphas else float(r)
    by_length = sorted(ranks, key=lambda n: (-len(n), n))  # longest (most specific) names first
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": int(lora_alpha) if lora_alpha.is_integer() else lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(ranks),
        "rank_pattern": {n: int(ranks[n]) for n in by_length if ranks[n] != r},
        "alpha_pattern": {n: alphas[n] for n in by_length if alphas[n] != lora_alpha},
        "modules_to_save": sorted(modules_to_save) or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _resolve_dtype(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return st_dtype(dtype)
    key = DTYPE_ALIASES.get(dtype.lower(), dtype.upper())
    if key not in ("F32", "F16", "BF16", "F64"):
        raise AdapterError(f"adapter dtype {dtype!r} is not a float dtype; use fp32, bf16 or fp16.")
    return key


def write_lora_adapter(
    out: str | os.PathLike[str],
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    base_model_name_or_path: str | None,
    alpha: float | Mapping[str, float] | None = None,
    scaling: float | Mapping[str, float] | None = None,
    embedding_modules: Collection[str] = (),
    modules_to_save: Mapping[str, Mapping[str, SavedTensor]] | None = None,
    fan_in_fan_out: bool = False,
    task_type: str | None = None,
    dtype: str | torch.dtype = "F32",
    record: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> AdapterWritten:
    """Write a PEFT LoRA adapter folder loadable by ``PeftModel.from_pretrained``.

    ``modules`` maps a full module name (``model.layers.0.self_attn.q_proj``) to its
    factors (A (r × in), B (out × r)), any float dtype, rounded once to ``dtype``.
    Ranks may differ per module. Effective ΔW = (alpha_m / r_m)·B·A where alpha_m is
    ``alpha`` (one number or per module), or ``scaling``·r_m, or r_m when neither is
    given (scaling 1). Names in ``embedding_modules`` are nn.Embedding modules
    (A is r × num_embeddings, B is embedding_dim × r). ``modules_to_save`` maps a
    module name to {parameter name: tensor or (Checkpoint, tensor name)} stored whole,
    in its own dtype (a checkpoint tensor is copied byte for byte).
    ``record`` (from :func:`surgeon.provenance.provenance`) goes to the safetensors
    metadata and ``surgeon_provenance.json`` with ``report``.
    """
    if not modules:
        raise AdapterError(
            f"{out}: no LoRA module to write; peft cannot load an adapter that targets no module "
            "(modules_to_save alone is not enough). Pass at least one (A, B) pair."
        )
    st = _resolve_dtype(dtype)
    ranks = {name: _check_factors(name, a, b) for name, (a, b) in modules.items()}
    alphas = _alphas(ranks, alpha, scaling)
    saved = modules_to_save or {}
    config = lora_config_dict(base_model_name_or_path=base_model_name_or_path, ranks=ranks, alphas=alphas,
                              modules_to_save=list(saved), fan_in_fan_out=fan_in_fan_out, task_type=task_type)
    specs, sources = _plan(modules, set(embedding_modules), saved, st)
    texts = {ADAPTER_CONFIG: json.dumps(config, indent=2) + "\n"}
    metadata = {}
    if record is not None:
        metadata = safetensors_metadata(record)
        texts[PROVENANCE_FILE] = provenance_file_text(record, report)
    with CheckpointWriter(out, specs, inputs=inputs, max_shard_size=_ONE_FILE, metadata=metadata,
                          extra_texts=texts, overwrite=overwrite, prefix="adapter_model") as writer:
        for spec in specs:
            source = sources[spec.name]
            if isinstance(source, tuple):
                writer.copy_from(source[0], source[1], as_name=spec.name)
            else:
                writer.write(spec.name, source.detach().to("cpu", torch_dtype(spec.dtype)).contiguous())
    return AdapterWritten(
        path=str(Path(out)), r=config["r"], lora_alpha=float(config["lora_alpha"]),
        rank_pattern=config["rank_pattern"], alpha_pattern=config["alpha_pattern"],
        target_modules=config["target_modules"], modules_to_save=sorted(saved),
        parameters=sum(_numel(s.shape) for s in specs), bytes=sum(s.nbytes for s in specs),
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _plan(
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    embeddings: set[str],
    saved: Mapping[str, Mapping[str, SavedTensor]],
    st: str,
) -> tuple[list[TensorSpec], dict[str, SavedTensor]]:
    """Tensor specs in a stable order (sorted keys) and where each tensor's data comes from."""
    sources: dict[str, SavedTensor] = {}
    for name, (a, b) in modules.items():
        if name in embeddings:
            sources[f"{PEFT_PREFIX}{name}.lora_embedding_A"] = a
            sources[f"{PEFT_PREFIX}{name}.lora_embedding_B"] = b
        else:
            sources[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
            sources[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
    factor_keys = set(sources)
    for module, params in saved.items():
        if module in modules:
            raise AdapterError(
                f"module {module!r} is both a LoRA target and in modules_to_save; peft allows one or the other. "
                "Drop it from one of the two."
            )
        for param, tensor in params.items():
            sources[f"{PEFT_PREFIX}{module}.{param}"] = tensor
    specs = []
    for key in sorted(sources):
        source = sources[key]
        if isinstance(source, tuple):
            info = source[0].info(source[1])
            specs.append(TensorSpec(key, info.dtype, info.shape))
        else:
            dtype = st if key in factor_keys else st_dtype(source.dtype)
            specs.append(TensorSpec(key, dtype, tuple(source.shape)))
    return specs, sources
