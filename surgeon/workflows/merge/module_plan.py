"""Which adapter modules merge through peft's own layer code, planned from headers alone.

The fast path (``plan``'s per-type planners, the native and torch streamers) covers the LoRA
family on Linear, GPT-2 Conv1D and Embedding layers. Everything else peft can merge (OFT, BOFT,
HRA, VB-LoRA, FourierFT, ..., LoRA variants, convolutions, MultiheadAttention,
``target_parameters``, trainable tokens) goes through ``peft_layer``, one module at a time: this
module groups an adapter's tensors by the base module they act on and plans one
``peft_module`` operation per module, acting on all of that module's base tensors at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surgeon.errors import AdapterError
from surgeon.io.adapter import (
    Adapter,
    AdapterLayout,
    AdapterModule,
    BaseNames,
    FullTensor,
    merge_route,
)
from surgeon.io.checkpoint import Checkpoint

PEFT_PREFIX = "base_model.model."
PEFT_MODULE = "peft_module"
SHARED_ROLE = "@shared:"  # role prefix of a model-level adapter tensor attached to every module
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
FAST_TYPES = {"LORA": {"lora_A", "lora_B", "lora_B_bias", "magnitude", "lora_embedding_A", "lora_embedding_B"},
              "ADALORA": {"lora_A", "lora_B", "lora_E"}, "VERA": {"vera_lambda_b", "vera_lambda_d"},
              "IA3": {"ia3_l"}, "LOHA": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
              "LOKR": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"},
              "HIRA": {"hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B"}}
_WRAPPERS = ("modules_to_save", "original_module")


@dataclass(frozen=True)
class ModuleRoute:
    """An adapter's tensors, sorted: ``fast`` modules for the per-type planners, ``peft`` modules for
    peft's layer code (adapter-side module path -> {name relative to the module: adapter tensor}),
    ``full`` whole-tensor replacements and ``shared`` model-level tensors (VeRA's, VB-LoRA's bank, ...)."""

    fast: tuple[AdapterModule, ...]
    peft: dict[str, dict[str, str]]
    full: tuple[FullTensor, ...]
    shared: tuple[str, ...]


def whole_adapter_through_peft(adapter: Adapter) -> bool:
    """Every module of this adapter goes through peft's layer code: not a fast type, or a LoRA variant."""
    return merge_route(adapter.config) == "peft"


class _Modules:
    """Base module paths (the prefixes of the base's tensor names) and their tensors."""

    def __init__(self, base: Checkpoint, names: BaseNames) -> None:
        self.base, self.names = base, names
        self.leaves = sorted({k.rsplit(".", 1)[-1] for k in base.keys()})

    def resolve(self, path: str, where: str) -> str | None:
        """The base module for an adapter-side module path (prefixes may differ, as for tensors)."""
        last = path.rsplit(".", 1)[-1]
        for leaf in self.leaves:
            found = self.names.resolve(f"{path}.{leaf}", what=where)
            if found is not None and found.endswith(f"{last}.{leaf}"):
                return found[: -len(leaf) - 1]
        return None

    def tensors(self, module: str) -> tuple[str, ...]:
        return tuple(k for k in self.base.keys() if k.startswith(module + "."))


def _fast(adapter: Adapter, module: AdapterModule, names: BaseNames, base: Checkpoint) -> bool:
    """Whether the per-type planners cover this module: its roles, 2-D factors, and a 2-D base weight (or
    none found: the planner resolves a tied head or names what does not fit)."""
    if "base_layer" in module.path.split(".") or not set(module.tensors) <= FAST_TYPES[adapter.config.peft_type]:
        return False
    if any(len(adapter.weights.info(key).shape) > 2 for key in module.tensors.values()):
        return False
    target = names.resolve(f"{module.path}.weight", what=str(adapter.folder))
    return target is None and not base_module_exists(base, module.path) or \
        target is not None and len(base.info(target).shape) == 2


def base_module_exists(base: Checkpoint, path: str) -> bool:
    return any(k.startswith(path + ".") or (k.split(".", 1)[-1]).startswith(path + ".") for k in base.keys())


def route_modules(base: Checkpoint, names: BaseNames, adapter: Adapter, layout: AdapterLayout) -> ModuleRoute:
    """Sort ``adapter``'s tensors into fast modules, peft modules, replacements and shared tensors."""
    modules = _Modules(base, names)
    where = str(adapter.folder)
    fast: list[AdapterModule] = []
    if whole_adapter_through_peft(adapter):
        keys, full = list(adapter.weights.keys()), []
    else:  # the fast type's own layout; modules it does not cover go to peft's layer code
        fast = [m for m in layout.modules.values() if _fast(adapter, m, names, base)]
        covered = {key for m in fast for key in m.tensors.values()} | {f.source for f in layout.full} | \
            {key for key in layout.shared.values()}
        keys, full = [k for k in adapter.weights.keys() if k not in covered], list(layout.full)
    shared, grouped = [], {}
    for key in keys:
        if key.startswith("base_model.") and not key.startswith(PEFT_PREFIX):
            shared.append(key)
            continue
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        parts = name.split(".")
        plain = ".".join(p for p in parts if p not in (*_WRAPPERS, "base_layer"))
        path = None
        if not (any(w in parts for w in _WRAPPERS) or names.resolve(plain, what=where) is not None):
            path = _module_path(parts, modules, where)
        if path is None:  # a whole-tensor replacement (the planner names what does not fit)
            full.append(FullTensor(plain, key, "base_layer" in parts))
            continue
        grouped.setdefault(path, {})[name[len(path) + 1:]] = key
    if not grouped and not fast and shared and whole_adapter_through_peft(adapter):
        grouped = {path: {} for path in _targeted_by_config(adapter, base)}  # e.g. UniLoRA: all in shared tensors
    return ModuleRoute(tuple(fast), grouped, tuple(full), tuple(shared))


def _targeted_by_config(adapter: Adapter, base: Checkpoint) -> list[str]:
    """The base modules the adapter's config targets, by peft's own matching (for tuners that save no
    per-module tensor at all)."""
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    raw = {k: v for k, v in adapter.config.raw.items() if k not in ("modules_to_save", "task_type")}
    config = peft.PeftConfig.from_peft_type(**raw)
    skip = set(config.modules_to_save or []) if hasattr(config, "modules_to_save") else set()
    skip |= set(adapter.config.modules_to_save or [])
    paths = sorted({k.rsplit(".", 1)[0] for k in base.keys() if "." in k})
    return [p for p in paths if p.rsplit(".", 1)[-1] not in skip and check_target_module_exists(config, p)]


def _module_path(parts: list[str], modules: _Modules, where: str) -> str | None:
    """The adapter-side path of the module a tensor belongs to: the part before peft's ``base_layer``
    (a MultiheadAttention or stacked wrappers), else the longest prefix that is a base module."""
    if "base_layer" in parts:
        head = ".".join(parts[: parts.index("base_layer")])
        return head if modules.resolve(head, where) is not None or modules.tensors(head) else None
    for end in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:end])
        if modules.resolve(path, where) is not None:
            return path
    return None


def peft_module_ops(base: Checkpoint, names: BaseNames, adapter: Adapter, idx: int, weight: float,
                    routed: ModuleRoute) -> list[tuple[str, dict[str, Any]]]:
    """One ``peft_module`` operation per peft-routed module, registered on each of the module's base tensors
    (``MergeOp`` keyword arguments, so that ``plan`` builds them)."""
    modules = _Modules(base, names)
    where = str(adapter.folder)
    shared = {SHARED_ROLE + key: key for key in routed.shared}
    planned = []
    for path, rel in routed.peft.items():
        found = modules.resolve(path, where)
        group = modules.tensors(found) if found is not None else ()
        if not group:
            raise AdapterError(
                f"{where}: adapter module {path!r} acts on base tensors the base {base.root} does not have; the "
                f"adapter was trained on a different model (its config names {adapter.config.base_model!r})."
            )
        for name in group:
            if base.info(name).dtype not in FLOAT_DTYPES:
                raise AdapterError(
                    f"{base.root}: base tensor {name!r} is stored as {base.info(name).dtype}, not floating point (a "
                    "quantized base?); merge into the unquantized base model (bf16/fp16/fp32) instead."
                )
        kw = {"kind": PEFT_MODULE, "adapter": idx, "module": path, "tensors": {**rel, **shared}, "weight": weight,
              "group": group}
        planned += [(name, kw) for name in group]
    return planned
