"""An adapter config that promises what its files lack is refused before anything is read.

peft loads such a config and either fails or, worse, merges something else: ``"r": "four"`` falls back
to a default rank, ``use_dora: true`` without magnitude vectors merges as plain LoRA, a string in
``alpha_pattern`` is not a scale. Each check names the file and the key or tensor, what was expected,
what was found, and the fix, in one line.
"""

from __future__ import annotations

import math
from typing import Any

from surgeon.errors import AdapterError
from surgeon.io.adapter import ADAPTER_CONFIG, Adapter, AdapterLayout

# Keys whose value, when present and not null, must be a number (rank-like ones a positive integer).
_RANKS = ("r", "init_r", "target_r")
_FAST_RANKED = ("LORA", "ADALORA", "VERA", "LOHA", "LOKR", "HIRA")  # where r is a rank that must be >= 1
_SCALES = ("lora_alpha", "alpha")
_PATTERNS = {"rank_pattern": True, "alpha_pattern": False}  # name -> holds ranks (positive integers)
_DORA_FACTORS = ("lora_A", "lora_embedding_A")


def _number_problem(value: Any, *, rank: bool) -> str | None:
    """What is wrong with ``value`` as a rank (a positive integer) or a scale (a finite number); None if fine."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"the {type(value).__name__} {value!r}"
    if not math.isfinite(value):
        return f"{value!r}"
    if rank and (value != int(value) or value < 1):
        return f"{value!r}"
    return None


def check_config_promises(adapter: Adapter, layout: AdapterLayout) -> None:
    """Refuse a config whose numbers are not numbers, or whose DoRA flag disagrees with the saved tensors."""
    where = adapter.folder / ADAPTER_CONFIG
    raw = adapter.config.raw
    for key in _RANKS + _SCALES:
        if raw.get(key) is None:
            continue
        rank = key in _RANKS
        if rank and raw[key] == 0 and adapter.config.peft_type not in _FAST_RANKED:
            continue  # OFT/BOFT/...: r=0 means "sized by block size"; peft's layer code checks the rest
        problem = _number_problem(raw[key], rank=rank)
        if problem:
            want = "a positive integer (the rank, e.g. 8)" if rank else "a number (e.g. 16)"
            raise AdapterError(f"{where}: {key!r} is {problem}, expected {want}; fix the config to the value the "
                               "adapter was trained with.")
    for key, rank in _PATTERNS.items():
        patterns = raw.get(key)
        if patterns is None or (key == "rank_pattern" and adapter.config.peft_type == "ADALORA"):
            continue  # AdaLoRA's rank_pattern holds boolean masks of the kept singular values
        if not isinstance(patterns, dict):
            raise AdapterError(f"{where}: {key!r} is {patterns!r}, expected an object mapping module names to "
                               "numbers; fix or remove it.")
        for module, value in patterns.items():
            problem = _number_problem(value, rank=rank)
            if problem:
                want = "a positive integer rank" if rank else "a number"
                raise AdapterError(f"{where}: {key}[{module!r}] is {problem}, expected {want}; fix the config to the "
                                   "value the adapter was trained with.")
    _check_dora(adapter, layout)


def _check_dora(adapter: Adapter, layout: AdapterLayout) -> None:
    if adapter.config.peft_type != "LORA":
        return
    dora = bool(adapter.config.raw.get("use_dora"))
    for module in layout.modules.values():
        factor = next((module.tensors[r] for r in _DORA_FACTORS if r in module.tensors), None)
        if factor is None:
            continue
        has = "magnitude" in module.tensors
        if dora and not has:
            raise AdapterError(
                f"{adapter.folder}: {ADAPTER_CONFIG} says use_dora: true but module {module.path!r} has no magnitude "
                f"vector (lora_magnitude_vector) beside {factor!r}; the weights are incomplete or the flag is wrong. "
                "Re-save the adapter with peft, or set use_dora: false if it was trained as plain LoRA."
            )
        if has and not dora:
            raise AdapterError(
                f"{adapter.folder}: {module.tensors['magnitude']!r} is a DoRA magnitude vector but {ADAPTER_CONFIG} "
                "does not set use_dora: true; peft would merge it as plain LoRA. Set use_dora: true if it was "
                "trained with DoRA, or re-save the adapter."
            )
