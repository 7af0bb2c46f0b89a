"""Planning a merge: which adapter tensors act on which base tensor, from headers alone.

Every name, shape and scaling is resolved here, before a tensor is read, so that a
mismatched adapter fails fast with the offending tensor named, and so that other
workflows (``diff --adapter``, spectra of BASE + adapter) can reuse the plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from surgeon.errors import AdapterError, SurgeonError
from surgeon.io.adapter import Adapter, AdapterModule, BaseNames, adapter_layout, check_mergeable, pattern_value
from surgeon.io.checkpoint import Checkpoint
from surgeon.workflows.convert import FLOAT_DTYPES

# Architectures whose projections are transformers' Conv1D (weight stored in × out).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"}
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                     "tok_embeddings.weight", "shared.weight")
LOST_WARNING = 0.5  # warn when more than half of ‖ΔW‖ is lost to output rounding


@dataclass(frozen=True)
class MergeOp:
    """One adapter module acting on one base tensor.

    ``kind``: lora, lora_embedding, dora, dora_embedding, lora_bias, adalora, vera, ia3,
    ia3_bias, loha, lokr, hira, hira_embedding, replace (modules_to_save, trained biases) or
    base_layer (a saved copy of the frozen base tensor). ``tensors`` maps roles to adapter
    tensor names; ``scaling`` already includes the adapter's weight.
    """

    kind: str
    adapter: int
    module: str
    tensors: dict[str, str]
    scaling: float = 1.0
    weight: float = 1.0
    fan_in_fan_out: bool = False
    ranknum: float = 0.0
    features: tuple[int, int] = (0, 0)  # (out, in) of the module, for VeRA's shared projections


@dataclass(frozen=True)
class MergePlan:
    """What acts on which base tensor; built from headers only.

    ``targets`` maps every base tensor the adapters change (modules_to_save replacements
    included) to its operations in application order.
    """

    adapters: tuple[Adapter, ...]
    weights: tuple[float, ...]
    targets: dict[str, tuple[MergeOp, ...]]
    vera_projections: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)  # idx -> key, r, in, out
    _cache: dict[Any, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def describe(self, name: str) -> str:
        """'lora(a0)+dora(a1)' for a target, for reports."""
        return "+".join(f"{op.kind}(a{op.adapter})" for op in self.targets.get(name, ()))


# -- planning ---------------------------------------------------------------------------------
class _Planner:
    """Plans one adapter against the base: resolves names, checks shapes, computes scalings."""

    def __init__(self, base: Checkpoint, names: BaseNames, adapter: Adapter, idx: int, weight: float) -> None:
        self.base, self.names, self.adapter, self.idx, self.weight = base, names, adapter, idx, weight
        self.cfg = adapter.config.raw
        self.base_config = base.config() or {}
        conv1d_model = self.base_config.get("model_type") in CONV1D_MODEL_TYPES
        self.default_fifo = bool(self.cfg.get("fan_in_fan_out")) or conv1d_model
        self.where = str(adapter.folder)
        self.vera_dims: list[tuple[int, int]] = []

    def shape(self, role_name: str) -> tuple[int, ...]:
        return self.adapter.weights.info(role_name).shape

    def fail_shape(self, tensor: str, got: Sequence[int], target: str) -> AdapterError:
        return AdapterError(
            f"{self.where}: adapter tensor {tensor!r} gives a change of shape {list(got)} for base tensor {target!r}, "
            f"which is {list(self.base.info(target).shape)}; the adapter was trained on a different model "
            f"(its config names {self.adapter.config.base_model!r}). Merge it onto the model it was trained on."
        )

    def target(self, module: AdapterModule, param: str = "weight") -> str:
        name = f"{module.path}.{param}"
        found = self.names.resolve(name, what=self.where)
        if found is None and param == "weight" and module.path.split(".")[-1] == "lm_head" and \
                self.base_config.get("tie_word_embeddings", True):
            for suffix in _INPUT_EMBEDDINGS:  # lm_head is tied to (stored as) the input embedding
                found = self.names.resolve(suffix, what=self.where) if suffix in self.names.keys or \
                    any(k.endswith("." + suffix) for k in self.names.keys) else None
                if found:
                    break
        if found is None:
            first = next(iter(module.tensors.values()))
            raise AdapterError(
                f"{self.where}: adapter tensor {first!r} targets {name!r}, which the base {self.base.root} does not have; "
                f"the adapter was trained on a different model (its config names {self.adapter.config.base_model!r}). "
                "Merge it onto the model it was trained on."
            )
        info = self.base.info(found)
        if info.dtype not in FLOAT_DTYPES:
            raise AdapterError(
                f"{self.base.root}: base tensor {found!r} is stored as {info.dtype}, not floating point (a quantized "
                "base?); merge into the unquantized base model (bf16/fp16/fp32) instead."
            )
        return found

    def orientation(self, target: str, out_in: tuple[int, int], tensor: str) -> bool:
        """True when the base stores the module transposed (Conv1D): decided by shape, else by config."""
        stored = self.base.info(target).shape
        linear, conv1d = stored == out_in, stored == out_in[::-1]
        if not (linear or conv1d):
            raise self.fail_shape(tensor, out_in, target)
        return conv1d if linear != conv1d else self.default_fifo

    def need(self, module: AdapterModule, *roles: str) -> list[str]:
        missing = [r for r in roles if r not in module.tensors]
        if missing:
            raise AdapterError(
                f"{self.where}: module {module.path!r} has {', '.join(sorted(module.tensors))} but lacks {missing[0]}; "
                f"the adapter file is incomplete for a {self.adapter.config.peft_type} adapter. Re-save it."
            )
        return [module.tensors[r] for r in roles]

    def rank_alpha(self, module: AdapterModule, rows_of: str) -> tuple[int, float]:
        cfg = self.adapter.config
        r = int(pattern_value(self.cfg.get("rank_pattern"), module.path, cfg.r))
        alpha = float(pattern_value(self.cfg.get("alpha_pattern"), module.path, cfg.alpha if cfg.alpha is not None else r))
        rows = self.shape(rows_of)[0]
        if rows != r:
            raise AdapterError(
                f"{self.where}: adapter_config.json gives module {module.path!r} rank {r} (r/rank_pattern) but "
                f"{rows_of!r} has {rows} rows; the config does not belong to these weights. Re-save the adapter."
            )
        return r, alpha

    def op(self, kind: str, module: AdapterModule, roles: Sequence[str], **kw: Any) -> MergeOp:
        return MergeOp(kind, self.idx, module.path, {r: module.tensors[r] for r in roles}, weight=self.weight, **kw)

    # -- per peft type ---------------------------------------------------------------------------
    def plan_module(self, module: AdapterModule) -> list[tuple[str, MergeOp]]:
        kind = self.adapter.config.peft_type
        allowed = _ROLES[kind]
        extra = sorted(set(module.tensors) - allowed)
        if extra:
            raise AdapterError(
                f"{self.where}: tensor {module.tensors[extra[0]]!r} is not part of a {kind} adapter; "
                "adapter_config.json's peft_type does not match the weights. Re-save the adapter."
            )
        return getattr(self, f"_plan_{kind.lower()}")(module)

    def _plan_lora(self, module: AdapterModule) -> list[tuple[str, MergeOp]]:
        rslora = bool(self.cfg.get("use_rslora"))
        if "lora_embedding_A" in module.tensors:
            a, b = self.need(module, "lora_embedding_A", "lora_embedding_B")
            r, alpha = self.rank_alpha(module, a)
            target = self.target(module)
            got = (self.shape(a)[1], self.shape(b)[0])
            if self.base.info(target).shape != got:
                raise self.fail_shape(a, got, target)
            scaling = self.weight * alpha / (math.sqrt(r) if rslora else r)
            dora = "magnitude" in module.tensors
            roles = ["lora_embedding_A", "lora_embedding_B"] + (["magnitude"] if dora else [])
            return [(target, self.op("dora_embedding" if dora else "lora_embedding", module, roles, scaling=scaling))]
        a, b = self.need(module, "lora_A", "lora_B")
        r, alpha = self.rank_alpha(module, a)
        target = self.target(module)
        fifo = self.orientation(target, (self.shape(b)[0], self.shape(a)[1]), a)
        scaling = self.weight * alpha / (math.sqrt(r) if rslora else r)
        dora = "magnitude" in module.tensors
        roles = ["lora_A", "lora_B"] + (["magnitude"] if dora else [])
        plan = [(target, self.op("dora" if dora else "lora", module, roles, scaling=scaling, fan_in_fan_out=fifo))]
        if "lora_B_bias" in module.tensors:
            bias = self.names.resolve(f"{module.path}.bias", what=self.where) if target.endswith(".weight") else None
            if bias is None or bias != target[: -len("weight")] + "bias":
                raise AdapterError(
                    f"{self.where}: module {module.path!r} has a trained lora_B bias (lora_bias=true) but the base "
                    f"has no {module.path}.bias to add it to; peft cannot merge this either. Use the adapter unmerged."
                )
            plan.append((bias, self.op("lora_bias", module, ["lora_B_bias"], scaling=scaling)))
        return plan

    def _plan_adalora(self, module: AdapterModule) -> list[tuple[str, MergeOp]]:
        a, b, _ = self.need(module, "lora_A", "lora_B", "lora_E")
        rank = self.shape(a)[0]
        if rank == 0:  # every singular value pruned: nothing to add
            return []
        init_r = float(self.cfg.get("init_r") or self.adapter.config.r or rank)
        alpha = float(self.cfg.get("lora_alpha") or 0)
        # peft: scaling = lora_alpha if > 0 else r, where r is the kept rank once rank_pattern resized the module
        scaling = self.weight * (alpha if alpha > 0 else float(rank if self.cfg.get("rank_pattern") else init_r))
        target = self.target(module)
        fifo = self.orientation(target, (self.shape(b)[0], self.shape(a)[1]), a)
        return [(target, self.op("adalora", module, ["lora_A", "lora_B", "lora_E"], scaling=scaling,
                                 fan_in_fan_out=fifo, ranknum=init_r))]

    def _plan_vera(self, module: AdapterModule) -> list[tuple[str, MergeOp]]:
        lb, _ = self.need(module, "vera_lambda_b", "vera_lambda_d")
        target = self.target(module)
        stored = self.base.info(target).shape
        out = self.shape(lb)[0]
        if len(stored) != 2 or out not in stored:
            raise self.fail_shape(lb, (out, -1), target)
        inn = stored[1] if stored[0] == out else stored[0]
        fifo = self.orientation(target, (out, inn), lb)
        self.vera_dims.append((out, inn))
        return [(target, self.op("vera", module, ["vera_lambda_b", "vera_lambda_d"], fan_in_fan_out=fifo,
                                 features=(out, inn)))]

    def _plan_ia3(self, module: AdapterModule) -> list[tuple[str, MergeOp]]:
        (l_name,) = self.need(module, "ia3_l")
        rows, cols = self.shape(l_name)
        target = self.target(module)
        stored = self.base.info(target).shape
        feedforward = rows == 1 and cols != 1 or (rows == cols == 1 and stored[-1] == 1 and stored[0] != 1)
        other = stored[1] if (stored[0] == max(rows, cols)) else stored[0]
        out_in = (other, cols) if feedforward else (rows, other)
        fifo = self.orientation(target, out_in, l_name)
        plan = [(target, self.op("ia3", module, ["ia3_l"], fan_in_fan_out=fifo))]
        bias = self.names.resolve(f"{module.path}.bias", what=self.where)
        if not feedforward and bias is not None and target.endswith(".weight") and bias == target[:-6] + "bias":
            plan.append((bias, self.op("ia3_bias", module, ["ia3_l"])))
        return plan

    def _plan_loha(self, module: AdapterModule) -> list[tuple[str, MergeOp]]:
        self._no_conv(module, "hada_t1", "hada_t2")
        w1a, w1b, _, _ = self.need(module, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        r, alpha = self.rank_alpha(module, w1b)
        target = self.target(module)
        got = (self.shape(w1a)[0], self.shape(w1b)[1])
        if self.base.info(target).shape != got:
            raise self.fail_shape(w1a, got, target)
        return [(target, self.op("loha", module, ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
                                 scaling=self.weight * alpha / r))]

    def _plan_lokr(self, module: AdapterModule) -> list[tuple[str, MergeOp]]:
        self._no_conv(module, "lokr_t2")
        t = module.tensors
        w1 = ["lokr_w1"] if "lokr_w1" in t else ["lokr_w1_a", "lokr_w1_b"]
        w2 = ["lokr_w2"] if "lokr_w2" in t else ["lokr_w2_a", "lokr_w2_b"]
        names = self.need(module, *w1, *w2)
        r = int(pattern_value(self.cfg.get("rank_pattern"), module.path, self.adapter.config.r))
        alpha = float(pattern_value(self.cfg.get("alpha_pattern"), module.path, self.adapter.config.alpha))
        s1 = self.shape(names[0]) if len(w1) == 1 else (self.shape(names[0])[0], self.shape(names[1])[1])
        s2 = self.shape(names[-1]) if len(w2) == 1 else (self.shape(names[-2])[0], self.shape(names[-1])[1])
        target = self.target(module)
        got = (s1[0] * s2[0], s1[1] * s2[1])
        if self.base.info(target).shape != got:
            raise self.fail_shape(names[0], got, target)
        return [(target, self.op("lokr", module, w1 + w2, scaling=self.weight * alpha / r))]

    def _plan_hira(self, module: AdapterModule) -> list[tuple[str, MergeOp]]:
        embedding = "hira_embedding_A" in module.tensors
        roles = ["hira_embedding_A", "hira_embedding_B"] if embedding else ["hira_A", "hira_B"]
        a, b = self.need(module, *roles)
        target = self.target(module)
        out_in = (self.shape(b)[0], self.shape(a)[1])
        if embedding:
            if self.base.info(target).shape != out_in[::-1]:
                raise self.fail_shape(a, out_in[::-1], target)
            return [(target, self.op("hira_embedding", module, roles))]
        fifo = self.orientation(target, out_in, a)
        return [(target, self.op("hira", module, roles, fan_in_fan_out=fifo))]

    def _no_conv(self, module: AdapterModule, *roles: str) -> None:
        for role in roles:
            if role in module.tensors:
                raise AdapterError(
                    f"{self.where}: module {module.path!r} has {role} (a convolution decomposition); surgeon merges "
                    "linear and embedding layers only. Merge this adapter with peft's merge_and_unload()."
                )

    def plan_full(self) -> list[tuple[str, MergeOp]]:
        """Whole-tensor replacements: modules_to_save, trained biases, saved base_layer copies."""
        plan = []
        for full in adapter_layout(self.adapter.weights).full:
            target = self.names.resolve(full.name, what=self.where)
            if target is None:
                raise AdapterError(
                    f"{self.where}: adapter tensor {full.source!r} replaces {full.name!r}, which the base {self.base.root} "
                    f"does not have; the adapter was trained on a different model (its config names "
                    f"{self.adapter.config.base_model!r}), or with resized or untied embeddings. Merge it onto that model."
                )
            got = self.shape(full.source)
            if got != self.base.info(target).shape:
                raise self.fail_shape(full.source, got, target)
            kind = "base_layer" if full.base_layer_copy else "replace"
            plan.append((target, MergeOp(kind, self.idx, full.name, {"tensor": full.source}, weight=self.weight)))
        return plan


_ROLES: dict[str, set[str]] = {
    "LORA": {"lora_A", "lora_B", "lora_B_bias", "magnitude", "lora_embedding_A", "lora_embedding_B"},
    "ADALORA": {"lora_A", "lora_B", "lora_E"},
    "VERA": {"vera_lambda_b", "vera_lambda_d"},
    "IA3": {"ia3_l"},
    "LOHA": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "LOKR": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    "HIRA": {"hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B"},
}
