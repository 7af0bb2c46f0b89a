"""The fine-tuning methods of `surgeon finetune`: peft configs, target presets, sparse LoRA, QLoRA.

Methods: full (every weight), lora, dora (weight-decomposed), rslora (scale
α/√r), pissa (principal singular vectors as init; saved converted so that it
merges onto the original base), sparse-lora (L1 by a proximal step and/or
magnitude pruning of A and B), hira (W' = W + W ⊙ (B·A), peft's HiRA tuner),
qlora (LoRA on a 4-bit NF4 base through bitsandbytes).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from surgeon.errors import AdapterError, DependencyError
from surgeon.workflows.train.options import METHODS

ADAPTER_METHODS = tuple(m for m in METHODS if m != "full")
TARGET_PRESETS = ("all-linear", "attention", "mlp", "qv")
DEFAULT_RANK = 8
DEFAULT_TARGETS = "all-linear"

_ATTENTION_PART = re.compile(r"attn|attention", re.IGNORECASE)
_QV_LEAVES = {"q_proj", "v_proj", "query", "value", "q", "v", "q_lin", "v_lin", "c_attn", "qkv_proj", "Wqkv", "query_key_value"}


def default_lr(method: str) -> float:
    """Full fine-tuning moves every weight and wants a small step; adapters start at zero and want a larger one.

    HiRA's update W ⊙ (B·A) is scaled by the base weights (|W| ~ 0.05 in MiniLM), so it needs about 10x
    LoRA's step: on the bundled sentiment set it reaches 56% at 1e-3 and 89% at 1e-2 (3 epochs).
    """
    if method == "full":
        return 5e-5
    return 1e-2 if method == "hira" else 1e-3


def default_alpha(rank: int) -> float:
    """α = 2r, as in the intruder-dimension study (arXiv 2410.21228): scale s = α/r = 2 at every rank."""
    return float(2 * rank)


def check_method_available(method: str) -> None:
    """Refuse a method whose library is missing, naming what to install."""
    import peft

    if method == "hira" and not hasattr(peft, "HiraConfig"):
        raise DependencyError(
            f"--method hira needs peft's HiRA tuner (peft.HiraConfig), which peft {peft.__version__} lacks; "
            "run pip install -U peft."
        )
    if method == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise DependencyError(
                "--method qlora needs bitsandbytes for the 4-bit NF4 base, and it is not installed; "
                "run pip install bitsandbytes (CPU wheels exist for Linux x86-64) or use --method lora."
            )
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # a broken native library raises anything
            raise DependencyError(
                f"--method qlora: bitsandbytes is installed but does not load ({str(exc).splitlines()[0]}); "
                "reinstall it with pip install -U bitsandbytes or use --method lora."
            ) from None


def nf4_quantization() -> Any:
    """The QLoRA base: 4-bit NormalFloat weights, double quantization, float32 compute.

    Task heads (often initialized fresh, and trained in full) stay in float32.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32,
                              llm_int8_skip_modules=["classifier", "score", "lm_head"])


# -- target modules ------------------------------------------------------------------------------

def _is_linear(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def block_linear_modules(model: torch.nn.Module) -> list[str]:
    """Linear (and GPT-2 Conv1D) modules inside the repeated transformer blocks, in model order.

    A block is any path with a numeric component (``layer.3``, ``h.0``): this
    leaves out embeddings, poolers, LM and classification heads.
    """
    return [name for name, module in model.named_modules()
            if _is_linear(module) and any(part.isdigit() for part in name.split("."))]


def _select(names: list[str], preset: str) -> list[str]:
    def in_attention(name: str) -> bool:
        return any(_ATTENTION_PART.search(part) for part in name.split(".")[:-1])

    if preset == "attention":
        return [n for n in names if in_attention(n)]
    if preset == "mlp":
        return [n for n in names if not in_attention(n)]
    if preset == "qv":
        return [n for n in names if in_attention(n) and n.split(".")[-1] in _QV_LEAVES]
    return names


def _pattern(names: list[str]) -> str:
    """One regex (peft full-matches it) for modules repeated per block: 'a\\.\\d+\\.(?:q|v)'."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        last_index = max(i for i, part in enumerate(parts) if part.isdigit())
        prefix = r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in parts[:last_index + 1])
        suffix = r"\.".join(re.escape(p) for p in parts[last_index + 1:])
        if suffix not in groups.setdefault(prefix, []):
            groups[prefix].append(suffix)
    alternatives = [p + r"\." + (s[0] if len(s) == 1 else "(?:" + "|".join(s) + ")") for p, s in groups.items()]
    return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"


@dataclass(frozen=True)
class Targets:
    """What to adapt: the value given to peft and the matched module names."""

    spec: str
    peft_value: str | list[str]
    modules: tuple[str, ...]


def resolve_targets(model: torch.nn.Module, spec: str | None, *, base: str) -> Targets:
    """A preset (all-linear, attention, mlp, qv) or a comma list of module names (suffixes)."""
    spec = spec or DEFAULT_TARGETS
    names = block_linear_modules(model)
    if spec in TARGET_PRESETS:
        chosen = _select(names, spec)
        if not chosen:
            leaves = sorted({n.split(".")[-1] for n in names}) or ["none"]
            raise AdapterError(
                f"{base}: --targets {spec} matches no module (linear layers in blocks: {', '.join(leaves)}); "
                "pass --targets with module names."
            )
        return Targets(spec, _pattern(chosen), tuple(chosen))
    wanted = [t.strip() for t in spec.split(",") if t.strip()]
    modules = [name for name, _ in model.named_modules()]
    for target in wanted:
        if not any(m == target or m.endswith("." + target) for m in modules):
            leaves = sorted({n.split(".")[-1] for n in names}) or ["none"]
            raise AdapterError(
                f"{base}: --targets {target!r} matches no module (linear layers in blocks: {', '.join(leaves)}); "
                f"use those names or a preset ({', '.join(TARGET_PRESETS)})."
            )
    chosen = [m for m in modules if any(m == t or m.endswith("." + t) for t in wanted)]
    return Targets(spec, wanted, tuple(chosen))


def uses_conv1d(model: torch.nn.Module, modules: Sequence[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    by_name = dict(model.named_modules())
    return any(isinstance(by_name.get(name), Conv1D) for name in modules)


def peft_config(method: str, *, rank: int, alpha: float, targets: Targets, modules_to_save: list[str] | None,
                task_type: str, fan_in_fan_out: bool) -> Any:
    """The peft config of an adapter method (LoraConfig, or HiraConfig for hira)."""
    import peft

    common = dict(r=rank, target_modules=targets.peft_value, modules_to_save=modules_to_save or None,
                  task_type=task_type, fan_in_fan_out=fan_in_fan_out)
    if method == "hira":
        return peft.HiraConfig(**common)
    init: bool | str = "pissa" if method == "pissa" else True
    return peft.LoraConfig(lora_alpha=alpha, lora_dropout=0.0, use_dora=method == "dora",
                           use_rslora=method == "rslora", init_lora_weights=init, **common)


# -- sparse LoRA ---------------------------------------------------------------------------------

class SparseLoRA:
    """Sparsity for LoRA factors A (r × in) and B (out × r).

    ``l1``: after every optimizer step, the proximal step of λ‖·‖₁ (soft
    threshold by lr·λ) sets small entries exactly to zero. ``sparsity``: at the
    end of epoch e of E, each factor is magnitude-pruned to
    ``sparsity·(1 − (1 − e/E)³)`` zeros (cubic schedule, the target at the end);
    pruned entries stay zero through later updates.
    """

    def __init__(self, model: torch.nn.Module, *, l1: float | None, sparsity: float | None, epochs: int) -> None:
        self.factors = [(n, p) for n, p in model.named_parameters()
                        if p.requires_grad and (".lora_A." in n or ".lora_B." in n)]
        if not self.factors:
            raise AdapterError("sparse LoRA found no lora_A/lora_B parameters to sparsify.")
        self.l1 = l1
        self.target = sparsity
        self.epochs = epochs
        self.masks: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        for name, p in self.factors:
            if self.l1:
                p.copy_(torch.sign(p) * torch.clamp(p.abs() - lr * self.l1, min=0.0))
            mask = self.masks.get(name)
            if mask is not None:
                p.mul_(mask)

    @torch.no_grad()
    def end_epoch(self, epoch: int) -> None:
        """Prune after epoch ``epoch`` (0-based) following the cubic schedule."""
        if not self.target:
            return
        done = (epoch + 1) / self.epochs
        level = self.target * (1.0 - (1.0 - done) ** 3)
        for name, p in self.factors:
            self.masks[name] = magnitude_mask(p, level)
            p.mul_(self.masks[name])

    def achieved(self) -> float:
        """Fraction of exact zeros over all A and B entries."""
        zeros = sum(int((p == 0).sum()) for _, p in self.factors)
        total = sum(p.numel() for _, p in self.factors)
        return zeros / total


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A 0/1 mask (dtype of ``weight``) that zeros the round(sparsity·numel) smallest |entries|."""
    k = int(round(sparsity * weight.numel()))
    mask = torch.ones_like(weight)
    if k <= 0:
        return mask
    drop = torch.topk(weight.abs().reshape(-1), k, largest=False).indices
    mask.view(-1)[drop] = 0
    return mask
