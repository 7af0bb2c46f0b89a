"""`surgeon inspect`: what a checkpoint or adapter holds, from headers alone."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgeon.io.adapter import (
    ADAPTER_WEIGHTS,
    FAST_TYPES,
    PEFT_LAYER_TYPES,
    PROMPT_LEARNING_TYPES,
    ROUTE_NAMES,
    RUNTIME_ONLY_TYPES,
    Adapter,
    is_adapter_folder,
    merge_route,
)
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.resolve import resolve_path


@dataclass(frozen=True)
class FileEntry:
    name: str
    bytes: int
    tensors: int


@dataclass(frozen=True)
class DtypeEntry:
    tensors: int
    parameters: int
    bytes: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: list[int]
    file: str


@dataclass(frozen=True)
class AdapterSummary:
    peft_type: str
    r: int | None
    alpha: float | None
    target_modules: list[str] | str | None
    modules_to_save: list[str] | None
    base_model: str | None
    extra: dict[str, Any]
    merge_route: str = ""  # how `surgeon merge` merges it: fast, peft or none (see merge_support())


@dataclass(frozen=True)
class InspectReport:
    path: str
    format: str
    files: list[FileEntry]
    tensor_count: int
    parameter_count: int
    bytes: int
    dtypes: dict[str, DtypeEntry]
    architecture: str | None
    model_type: str | None
    metadata: dict[str, str]
    adapter: AdapterSummary | None
    tensors: list[TensorEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ADAPTER_EXTRA_KEYS = ("use_rslora", "use_dora", "init_lora_weights", "rank_pattern", "alpha_pattern",
                       "fan_in_fan_out", "lora_bias", "bias", "task_type", "revision", "init_r", "target_r")


def inspect_checkpoint(path: str | os.PathLike[str]) -> InspectReport:
    """Summarize a model checkpoint or PEFT adapter folder without reading tensor data."""
    local = resolve_path(path)
    adapter_summary = None
    if local.is_dir() and is_adapter_folder(local):
        with Adapter.open(local) as adapter:
            cfg = adapter.config
            adapter_summary = AdapterSummary(
                peft_type=cfg.peft_type, r=cfg.r, alpha=cfg.alpha, target_modules=cfg.target_modules,
                modules_to_save=cfg.modules_to_save, base_model=cfg.base_model,
                extra={k: cfg.raw[k] for k in _ADAPTER_EXTRA_KEYS if k in cfg.raw}, merge_route=merge_route(cfg),
            )
        ckpt = Checkpoint.open(local / ADAPTER_WEIGHTS)
        fmt = "peft adapter"
    else:
        ckpt = Checkpoint.open(local)
        fmt = "sharded safetensors" if ckpt.index_file else "safetensors"
    with ckpt:
        files = [FileEntry(h.path.name, h.file_size, len(h.tensors)) for h in ckpt.headers]
        dtypes: dict[str, list[int]] = {}
        for t in ckpt.tensors.values():
            entry = dtypes.setdefault(t.dtype, [0, 0, 0])
            entry[0] += 1
            entry[1] += t.numel
            entry[2] += t.nbytes
        config = ckpt.config() if fmt != "peft adapter" else None
        archs = (config or {}).get("architectures") or [None]
        return InspectReport(
            path=str(path),
            format=fmt,
            files=files,
            tensor_count=len(ckpt),
            parameter_count=sum(t.numel for t in ckpt.tensors.values()),
            bytes=ckpt.total_bytes,
            dtypes={k: DtypeEntry(*v) for k, v in sorted(dtypes.items())},
            architecture=archs[0],
            model_type=(config or {}).get("model_type"),
            metadata=ckpt.metadata,
            adapter=adapter_summary,
            tensors=[TensorEntry(t.name, t.dtype, list(t.shape), Path(t.file).name) for t in ckpt.tensors.values()],
        )


def merge_support() -> dict[str, list[str]]:
    """Every peft type by how ``surgeon merge`` treats it (the README's support list is tested against this):
    "fast" (surgeon's own streamed arithmetic, bit-identical to peft), "peft" (peft's layer code, one module
    at a time; also any LoRA variant or layout the fast path does not cover: convolutions, MultiheadAttention,
    target_parameters, trainable tokens, ...) and "none" (no weights to merge, or peft cannot merge them)."""
    return {"fast": list(FAST_TYPES), "peft": list(PEFT_LAYER_TYPES),
            "none": [*PROMPT_LEARNING_TYPES, *RUNTIME_ONLY_TYPES]}


def merge_support_text() -> str:
    """The support list as Markdown lines (what the README carries between its merge-support markers)."""
    names = {"fast": "Fast path (native kernel / torch streamed)", "peft": "Through peft's layer code, one module "
             "at a time", "none": "Refused (no weights to merge, or peft cannot merge them)"}
    return "\n".join(f"- {names[k]}: {', '.join(f'`{t}`' for t in v)}." for k, v in merge_support().items())


__all__ = ["ROUTE_NAMES", "InspectReport", "inspect_checkpoint", "merge_support", "merge_support_text"]
