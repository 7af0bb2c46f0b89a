"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

Read straight from the files: no peft model object, no transformers model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgeon.errors import AdapterError, CheckpointNotFoundError, UnsupportedAdapterError
from surgeon.io.checkpoint import PICKLE_SUFFIXES, Checkpoint, _refuse_pickle
from surgeon.io.output import note_input
from surgeon.io.textfile import check_regular

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_numbers(path: Path, raw: dict[str, Any]) -> None:
    """"r": "four" must not become a rank read from the weights: the config's numbers are numbers."""
    for key in ("r", "init_r", "lora_alpha", "alpha"):
        if key in raw and raw[key] is not None and not _is_number(raw[key]):
            raise AdapterError(f"{path}: {key!r} is {raw[key]!r}, not a number; write it as a number "
                               f"(e.g. \"{key}\": 8) or re-save the adapter with peft's save_pretrained.")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = raw.get(key)
        if patterns is None or key == "rank_pattern" and str(raw.get("peft_type", "")).upper() == "ADALORA":
            continue  # AdaLoRA's rank_pattern holds boolean masks of the kept singular values
        if not isinstance(patterns, dict):
            raise AdapterError(f"{path}: {key!r} is {patterns!r}, not an object of pattern -> number; "
                               "re-save the adapter with peft's save_pretrained.")
        for pattern, value in patterns.items():
            if not _is_number(value):
                raise AdapterError(f"{path}: {key}[{pattern!r}] is {value!r}, not a number; write it as a number "
                                   "or re-save the adapter with peft's save_pretrained.")


def is_adapter_folder(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT adapter config surgeon uses (``raw`` keeps everything)."""

    peft_type: str
    r: int | None
    alpha: float | None
    target_modules: list[str] | str | None
    modules_to_save: list[str] | None
    base_model: str | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AdapterConfig:
        peft_type = str(raw.get("peft_type", "")).upper()
        r = raw.get("r", raw.get("init_r"))
        alpha = raw.get("lora_alpha", raw.get("alpha"))
        targets = raw.get("target_modules")
        if isinstance(targets, (set, tuple)):
            targets = sorted(targets)
        return cls(
            peft_type=peft_type,
            r=int(r) if isinstance(r, (int, float)) else None,
            alpha=float(alpha) if isinstance(alpha, (int, float)) else None,
            target_modules=targets,
            modules_to_save=list(raw["modules_to_save"]) if raw.get("modules_to_save") else None,
            base_model=raw.get("base_model_name_or_path"),
            raw=raw,
        )


class Adapter:
    """An adapter folder: its config and a lazily read :class:`Checkpoint` of its weights."""

    def __init__(self, folder: Path, config: AdapterConfig, weights: Checkpoint) -> None:
        self.folder = folder
        self.config = config
        self.weights = weights

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Adapter:
        folder = Path(path)
        if not folder.exists():
            raise CheckpointNotFoundError(f"{folder}: no such adapter folder; check the path.")
        check_regular(folder / ADAPTER_CONFIG, what="adapter config", error=AdapterError)  # a FIFO would block
        if not folder.is_dir() or not (folder / ADAPTER_CONFIG).is_file():
            raise AdapterError(
                f"{folder}: not a PEFT adapter folder (no {ADAPTER_CONFIG}); give the folder that "
                "save_pretrained() wrote for the adapter."
            )
        try:
            raw = json.loads((folder / ADAPTER_CONFIG).read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterError(f"{folder / ADAPTER_CONFIG}: not valid JSON ({exc}); re-download or re-save the adapter.") from None
        note_input(folder)
        if not isinstance(raw, dict):
            raise AdapterError(f"{folder / ADAPTER_CONFIG}: expected a JSON object, found a {type(raw).__name__}; "
                               "re-save the adapter with peft's save_pretrained or re-download it.")
        _check_numbers(folder / ADAPTER_CONFIG, raw)
        weights_path = folder / ADAPTER_WEIGHTS
        if not weights_path.is_file():
            pickles = [p for p in folder.iterdir() if p.name.startswith("adapter_model") and p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise _refuse_pickle(pickles[0])
            raise AdapterError(f"{folder}: {ADAPTER_WEIGHTS} is missing; re-download or re-save the adapter.")
        return cls(folder, AdapterConfig.from_dict(raw), Checkpoint.open(weights_path))

    def close(self) -> None:
        self.weights.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- adapter tensor layout --------------------------------------------------------------------
PEFT_PREFIX = "base_model.model."
_SHARED_PREFIX = "base_model."
# Suffix of a per-module adapter tensor -> its role. Longest suffixes first (".lora_A.weight" before ".lora_A").
ROLE_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"), (".lora_B.bias", "lora_B_bias"),
    (".lora_magnitude_vector.weight", "magnitude"), (".lora_magnitude_vector", "magnitude"),
    (".lora_embedding_A", "lora_embedding_A"), (".lora_embedding_B", "lora_embedding_B"),
    (".lora_A", "lora_A"), (".lora_B", "lora_B"), (".lora_E", "lora_E"),
    (".vera_lambda_b", "vera_lambda_b"), (".vera_lambda_d", "vera_lambda_d"),
    (".ia3_l", "ia3_l"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"), (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"), (".lokr_w1", "lokr_w1"),
    (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"), (".lokr_w2", "lokr_w2"), (".lokr_t2", "lokr_t2"),
    (".hira_embedding_A", "hira_embedding_A"), (".hira_embedding_B", "hira_embedding_B"),
    (".hira_A", "hira_A"), (".hira_B", "hira_B"),
)
# Model-level tensors shared by every module (VeRA's frozen random projections).
SHARED_TENSORS = {"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"}


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module: its path in the model peft wrapped (``model.layers.0.self_attn.q_proj``)
    and its adapter tensors by role (``lora_A`` -> adapter tensor name)."""

    path: str
    tensors: dict[str, str]


@dataclass(frozen=True)
class FullTensor:
    """An adapter tensor that replaces a whole base tensor (modules_to_save, a saved ``base_layer``
    copy, a trained bias). ``name`` is the model-side tensor name with peft's wrappers removed."""

    name: str
    source: str
    base_layer_copy: bool


@dataclass(frozen=True)
class AdapterLayout:
    modules: dict[str, AdapterModule]
    full: list[FullTensor]
    shared: dict[str, str]


def adapter_layout(weights: Checkpoint) -> AdapterLayout:
    """Sort an adapter's tensor names into per-module factors, whole-tensor replacements and shared
    tensors, from names alone (peft saves without the adapter name: ``base_model.model.<path>.lora_A.weight``)."""
    modules: dict[str, dict[str, str]] = {}
    full: list[FullTensor] = []
    shared: dict[str, str] = {}
    for key in weights.keys():
        if key in SHARED_TENSORS:
            shared[SHARED_TENSORS[key]] = key
            continue
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix, role in ROLE_SUFFIXES:
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[role] = key
                break
        else:
            parts = name.split(".")
            copy = "base_layer" in parts
            plain = ".".join(p for p in parts if p not in ("base_layer", "modules_to_save", "original_module"))
            full.append(FullTensor(plain, key, copy))
    return AdapterLayout({p: AdapterModule(p, t) for p, t in modules.items()}, full, shared)


def pattern_value(patterns: dict[str, Any] | None, module_path: str, default: Any) -> Any:
    """peft's ``rank_pattern``/``alpha_pattern`` lookup: the first key matching ``(.*\\.)?(key)$``."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return patterns[key]  # type: ignore[index]
    return default


class BaseNames:
    """Map model-side tensor names from an adapter onto a base checkpoint's tensor names.

    Exact names win. Otherwise leading components are dropped (an adapter trained on
    ``LlamaForCausalLM`` applied to a saved ``LlamaModel``) and/or a prefix is added (an adapter
    trained on a bare model applied to a task model), matching whole dotted components.
    """

    def __init__(self, keys: list[str]) -> None:
        self.keys = set(keys)
        self._by_suffix: dict[str, list[str]] = {}
        for key in keys:
            parts = key.split(".")
            for i in range(1, len(parts) - 1):
                self._by_suffix.setdefault(".".join(parts[i:]), []).append(key)

    def resolve(self, name: str, *, what: str) -> str | None:
        """The base tensor for ``name``, None when there is none; raises when several fit."""
        parts = name.split(".")
        for i in range(0, max(1, len(parts) - 1)):
            candidate = ".".join(parts[i:])
            if candidate in self.keys:
                return candidate
            found = self._by_suffix.get(candidate, [])
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise AdapterError(
                    f"{what}: adapter tensor for {name!r} matches several base tensors ({', '.join(sorted(found)[:3])}); "
                    "the adapter and base use different module prefixes. Give the base model the adapter was trained on "
                    "(same architecture class) so the names line up."
                )
        return None


# -- what surgeon can merge -------------------------------------------------------------------
# Merged by surgeon's own fast path (native/torch streamed, or whole in memory).
FAST_TYPES = ("LORA", "ADALORA", "VERA", "IA3", "LOHA", "LOKR", "HIRA")
# Merged module by module through peft's own layer code (surgeon.workflows.merge.peft_layer); any other
# weight-based type the installed peft knows is tried the same way.
PEFT_LAYER_TYPES = (
    "ADAMSS", "BEFT", "BOFT", "C3A", "DEFT", "DELORA", "FOURIERFT", "FROD", "GLORA", "GRALORA", "HRA", "LN_TUNING",
    "MISS", "OFT", "OSF", "PEANUT", "PSOFT", "PVERA", "RANDLORA", "ROAD", "SHIRA", "SUPERTUNING", "TINYLORA",
    "TRAINABLE_TOKENS", "UNILORA", "VBLORA", "WAVEFT",
)
MERGEABLE_TYPES = FAST_TYPES + PEFT_LAYER_TYPES
# Methods that add virtual tokens or route between adapters at run time: no weights to merge.
PROMPT_LEARNING_TYPES = ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT",
                         "CPT", "CARTRIDGE")
RUNTIME_ONLY_TYPES = ("XLORA", "POLY", "LILY")  # peft merges none of them (Lily: NotImplementedError)
_MODIFIED_BASE_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# LoraConfig fields selecting a variant or layout the fast path does not compute: peft's layer code does.
LORA_VARIANT_FIELDS = ("velora_config", "monteclora_config", "kasa_config", "use_bdlora", "bdlora_config",
                       "target_parameters", "trainable_token_indices", "alora_invocation_tokens", "arrow_config")
ROUTE_NAMES = {"fast": "surgeon's streamed fast path", "peft": "peft's own layer code, one module at a time",
               "none": "not mergeable"}


def merge_route(cfg: AdapterConfig) -> str:
    """How ``surgeon merge`` merges an adapter of this config: "fast" (its own streamed arithmetic), "peft"
    (peft's layer code, module by module; modules the fast path does not cover go there too) or "none"."""
    if cfg.peft_type in PROMPT_LEARNING_TYPES or cfg.peft_type in RUNTIME_ONLY_TYPES or not cfg.peft_type:
        return "none"
    if cfg.peft_type not in FAST_TYPES:
        return "peft"
    init = cfg.raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower() == "mica":
        return "peft"
    variant = cfg.peft_type in ("LORA", "ADALORA") and any(cfg.raw.get(k) not in (None, False, {}, [], 0)
                                                           for k in LORA_VARIANT_FIELDS)
    return "peft" if variant else "fast"


def check_mergeable(adapter: Adapter) -> None:
    """Refuse adapters whose merge onto the original base would be wrong or that have no weights to merge."""
    cfg, where = adapter.config, adapter.folder / ADAPTER_CONFIG
    if cfg.peft_type in PROMPT_LEARNING_TYPES:
        raise UnsupportedAdapterError(
            f"{where}: peft_type {cfg.peft_type!r} is a prompt-learning method: it adds virtual tokens and leaves the "
            "model's weights as they are, so there is nothing to merge. Use the adapter unmerged with peft."
        )
    if cfg.peft_type in RUNTIME_ONLY_TYPES:
        raise UnsupportedAdapterError(
            f"{where}: peft_type {cfg.peft_type!r} computes its change from each input at run time, so no fixed "
            "weights exist to merge (peft's merge_and_unload() refuses it too). Use the adapter unmerged with peft."
        )
    if not cfg.peft_type:
        raise UnsupportedAdapterError(
            f"{where}: no peft_type; this is not a PEFT adapter config. Re-save the adapter with peft's save_pretrained()."
        )
    init = cfg.raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_MODIFIED_BASE_INITS):
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights={init!r}: this adapter was trained against a modified base "
            "(PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA move part of W into the adapter at initialization), so adding it to "
            "the original base gives wrong weights. Re-save it converted with peft's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) (the saved config then says init_lora_weights=true), "
            "or merge it onto the modified base it was trained with."
        )
    if cfg.raw.get("layer_replication"):
        raise UnsupportedAdapterError(
            f"{where}: layer_replication={cfg.raw['layer_replication']!r} stacks copies of the base's layers, so the "
            "merged model has more layers than the base and does not fit its files. Use the adapter unmerged with peft."
        )
    # Every other type and LoRA variant (MiCA, VeLoRA, KaSA, ...) merges through peft's own layer code;
    # what peft itself cannot merge is refused there with peft's reason.
