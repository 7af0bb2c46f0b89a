"""Planning a merge: which adapter tensors act on which base tensor, from headers alone.

Every name, shape and scaling is resolved here, before a tensor is read, so that a
mismatched adapter fails fast with the offending tensor named, and so that other
workflows (``diff --adapter``, spectra of BASE + adapter) can reuse the plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from surgeon.errors import AdapterError, OptionError
from surgeon.io.adapter import (
    Adapter,
    AdapterModule,
    BaseNames,
    FullTensor,
    adapter_layout,
    check_mergeable,
    pattern_value,
)
from surgeon.io.checkpoint import Checkpoint
from surgeon.workflows.convert import FLOAT_DTYPES
from surgeon.workflows.merge.config_checks import check_config_promises
from surgeon.workflows.merge.module_plan import peft_module_ops, route_modules

# Architectures whose projections are transformers' Conv1D (weight stored in × out).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"}
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                     "tok_embeddings.weight", "shared.weight")


@dataclass(frozen=True)
class MergeOp:
    """One adapter module acting on one base tensor.

    ``kind``: lora, lora_embedding, dora, dora_embedding, lora_bias, adalora, vera, ia3,
    ia3_bias, loha, lokr, hira, hira_embedding, replace (modules_to_save, trained biases),
    base_layer (a saved copy of the frozen base tensor) or peft_module (a whole module merged by
    peft's layer code: ``module_plan``/``peft_layer``). ``tensors`` maps roles to adapter tensor
    names; ``scaling`` already includes the adapter's weight.
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
    group: tuple[str, ...] = ()  # peft_module: every base tensor of the module, merged together


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
    _cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def describe(self, name: str) -> str:
        """'lora(a0)+dora(a1)' for a target, for reports."""
        def kind(op: MergeOp) -> str:  # a module merged by peft's layer code is named by its tuner
            return f"{self.adapters[op.adapter].config.peft_type.lower()}/peft" if op.kind == "peft_module" else op.kind

        return "+".join(f"{kind(op)}(a{op.adapter})" for op in self.targets.get(name, ()))


# -- planning ---------------------------------------------------------------------------------
class _Planner:
    """Plans one adapter against the base: resolves names, checks shapes, computes scalings."""

    def __init__(self, base: Checkpoint, names: BaseNames, adapter: Adapter, idx: int, weight: float) -> None:
        self.base, self.names, self.adapter, self.idx, self.weight = base, names, adapter, idx, weight
        self.cfg = adapter.config.raw
        self.base_config = base.config() or {}
        # Only for square weights, where shapes cannot tell: peft itself forces fan_in_fan_out by layer
        # type (Conv1D: on, Linear: off), so the architecture decides; the adapter's flag only without one.
        model_type = self.base_config.get("model_type")
        self.default_fifo = model_type in CONV1D_MODEL_TYPES if model_type else bool(self.cfg.get("fan_in_fan_out"))
        self.where = str(adapter.folder)
        self.vera_dims: list[tuple[int, int]] = []
        self.vera_rank = 0

    def shape(self, role_name: str) -> tuple[int, ...]:
        return self.adapter.weights.info(role_name).shape

    def fail_shape(self, tensor: str, got: Sequence[int], target: str) -> AdapterError:
        return AdapterError(
            f"{self.where}: adapter tensor {tensor!r} gives a change of shape {list(got)} for base tensor {target!r}, "
            f"which is {list(self.base.info(target).shape)}; the adapter was trained on a different model "
            f"(its config names {self.adapter.config.base_model!r}). Merge it onto the model it was trained on."
        )

    def resolve(self, name: str) -> str | None:
        """The base tensor for a model-side name; a tied ``lm_head.weight`` is stored as the input embedding."""
        found = self.names.resolve(name, what=self.where)
        if found is None and name.split(".")[-2:] == ["lm_head", "weight"] and \
                self.base_config.get("tie_word_embeddings", True):
            for suffix in _INPUT_EMBEDDINGS:
                found = self.names.resolve(suffix, what=self.where)
                if found:
                    break
        return found

    def target(self, module: AdapterModule, param: str = "weight") -> str:
        name = f"{module.path}.{param}"
        found = self.resolve(name)
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

    def patterned_rank_alpha(self, module: AdapterModule) -> tuple[int, float]:
        """r and α for one module: rank_pattern/alpha_pattern, else r/lora_alpha, else peft's defaults (8, 8)."""
        cfg = self.adapter.config
        r = int(pattern_value(self.cfg.get("rank_pattern"), module.path, cfg.r if cfg.r is not None else 8))
        alpha = pattern_value(self.cfg.get("alpha_pattern"), module.path, cfg.alpha if cfg.alpha is not None else 8)
        return r, float(alpha)

    def rank_alpha(self, module: AdapterModule, rows_of: str, cols_of: str | None = None) -> tuple[int, float]:
        r, alpha = self.patterned_rank_alpha(module)
        rows = self.shape(rows_of)[0]
        if rows != r:
            raise AdapterError(
                f"{self.where}: adapter_config.json gives module {module.path!r} rank {r} (r/rank_pattern) but "
                f"{rows_of!r} has {rows} rows; the config does not belong to these weights. Re-save the adapter."
            )
        if cols_of is not None and self.shape(cols_of)[-1] != r:
            raise AdapterError(
                f"{self.where}: {cols_of!r} has {self.shape(cols_of)[-1]} columns but {rows_of!r} has {r} rows (the "
                "rank); the two factors must agree. Re-save the adapter from the model it was trained on."
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
        for tensor in module.tensors.values():
            if len(self.shape(tensor)) > 2:
                raise AdapterError(
                    f"{self.where}: adapter tensor {tensor!r} is {len(self.shape(tensor))}-dimensional (a convolution "
                    "layer); surgeon merges linear, Conv1D and embedding layers only. Merge this adapter with peft's "
                    "merge_and_unload()."
                )
        return getattr(self, f"_plan_{kind.lower()}")(module)

    def _plan_lora(self, module: AdapterModule) -> list[tuple[str, MergeOp]]:
        rslora = bool(self.cfg.get("use_rslora"))
        if "lora_embedding_A" in module.tensors:
            a, b = self.need(module, "lora_embedding_A", "lora_embedding_B")
            r, alpha = self.rank_alpha(module, a, b)
            target = self.target(module)
            got = (self.shape(a)[1], self.shape(b)[0])
            if self.base.info(target).shape != got:
                raise self.fail_shape(a, got, target)
            scaling = self.weight * alpha / (math.sqrt(r) if rslora else r)
            dora = "magnitude" in module.tensors
            roles = ["lora_embedding_A", "lora_embedding_B"] + (["magnitude"] if dora else [])
            return [(target, self.op("dora_embedding" if dora else "lora_embedding", module, roles, scaling=scaling))]
        a, b = self.need(module, "lora_A", "lora_B")
        r, alpha = self.rank_alpha(module, a, b)
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
        lb, ld = self.need(module, "vera_lambda_b", "vera_lambda_d")
        self.vera_rank = self.shape(ld)[0]
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
        feedforward = rows == 1 and cols != 1  # (1 × in) scales inputs, (out × 1) scales outputs
        known = cols if feedforward else rows
        if len(stored) != 2 or known not in stored:
            raise self.fail_shape(l_name, (rows, cols), target)
        linear_pos = 1 if feedforward else 0  # where a Linear (out × in) stores the known dimension
        other = stored[1 - linear_pos] if stored[linear_pos] == known else stored[linear_pos]
        out_in = (other, known) if feedforward else (known, other)
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
        r, alpha = self.patterned_rank_alpha(module)
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

    def vera_shared(self, planned: list[tuple[str, MergeOp]], shared: dict[str, str]
                    ) -> tuple[list[tuple[str, MergeOp]], tuple[int, int, int, int] | None]:
        """Attach VeRA's shared projections: saved ones (checked), else the seed to regenerate them."""
        r = self.vera_rank
        out = max(o for o, _ in self.vera_dims)
        inn = max(i for _, i in self.vera_dims)
        if "vera_A" in shared and "vera_B" in shared:
            a_shape, b_shape = self.shape(shared["vera_A"]), self.shape(shared["vera_B"])
            if a_shape[0] != r or a_shape[1] < inn or b_shape[0] < out or b_shape[1] != r:
                raise AdapterError(
                    f"{self.where}: shared projections vera_A {list(a_shape)} / vera_B {list(b_shape)} do not cover rank "
                    f"{r} and the targeted modules (up to {out} x {inn}); the adapter belongs to a different model."
                )
            extra = {"vera_A": shared["vera_A"], "vera_B": shared["vera_B"]}
            return [(t, replace(op, tensors={**op.tensors, **extra})) for t, op in planned], None
        return planned, (int(self.cfg.get("projection_prng_key", 0)), r, inn, out)

    def _no_conv(self, module: AdapterModule, *roles: str) -> None:
        for role in roles:
            if role in module.tensors:
                raise AdapterError(
                    f"{self.where}: module {module.path!r} has {role} (a convolution decomposition); surgeon merges "
                    "linear and embedding layers only. Merge this adapter with peft's merge_and_unload()."
                )

    def _task_head(self, name: str) -> bool:
        """A task head saved through modules_to_save (classifier, score, qa_outputs) of a task adapter."""
        task = str(self.adapter.config.raw.get("task_type") or "")
        return task in _TASK_MODELS and any(part in _HEADS for part in name.split(".")[:-1])

    def _fail_head(self, source: str, name: str) -> AdapterError:
        task = str(self.adapter.config.raw.get("task_type"))
        labels = self.shape(source)[0] if self.shape(source) else "N"
        return AdapterError(
            f"{self.where}: adapter tensor {source!r} is its task head {name!r} (task_type {task}), and the base "
            f"{self.base.root} is a bare model with no head to replace. Merge onto the task model instead: save "
            f"transformers.{_TASK_MODELS[task]}.from_pretrained(BASE, num_labels={labels}).save_pretrained(TASK_BASE) "
            "and give TASK_BASE as the base (its new head is replaced by the adapter's)."
        )

    def plan_full(self, full_tensors: Sequence[FullTensor] | None = None) -> list[tuple[str, MergeOp]]:
        """Whole-tensor replacements: modules_to_save, trained biases, saved base_layer copies."""
        plan = []
        for full in adapter_layout(self.adapter.weights).full if full_tensors is None else full_tensors:
            target = self.resolve(full.name)
            if target is None and self._task_head(full.name):
                raise self._fail_head(full.source, full.name)
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


_TASK_MODELS = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering"}
_HEADS = ("classifier", "score", "qa_outputs")


_ROLES: dict[str, set[str]] = {
    "LORA": {"lora_A", "lora_B", "lora_B_bias", "magnitude", "lora_embedding_A", "lora_embedding_B"},
    "ADALORA": {"lora_A", "lora_B", "lora_E"},
    "VERA": {"vera_lambda_b", "vera_lambda_d"},
    "IA3": {"ia3_l"},
    "LOHA": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "LOKR": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    "HIRA": {"hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B"},
}


def refuse_quantized_base(base: Checkpoint) -> None:
    """Merging into quantized codes would lose the adapter: ask for the unquantized base."""
    quant = (base.config() or {}).get("quantization_config")
    four_bit = any(k.endswith((".absmax", ".quant_map", "bitsandbytes__nf4", "bitsandbytes__fp4")) for k in base.keys())
    if four_bit or (isinstance(quant, dict) and (quant.get("load_in_4bit") or quant.get("bnb_4bit_quant_type"))):
        raise AdapterError(
            f"{base.root}: the base is stored quantized to 4 bits (bitsandbytes); a float ΔW cannot be added to 4-bit "
            "codes without re-quantizing away most of it. Merge into the unquantized model the 4-bit one was made from "
            "(bf16/fp16/fp32), e.g. the base_model_name_or_path of a QLoRA adapter."
        )
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise AdapterError(
            f"{base.root}: the base is stored quantized (quant_method {method!r}); merging into quantized weights is not "
            "supported. Merge into the unquantized model (bf16/fp16/fp32) instead."
        )


def plan_adapter_merge(base: Checkpoint, adapters: Sequence[tuple[Adapter, float]]) -> MergePlan:
    """Plan merging ``adapters`` (each with its weight, applied in order) into ``base``; headers only."""
    refuse_quantized_base(base)
    names = BaseNames(base.keys())
    steps: dict[str, list[MergeOp]] = {}
    vera: dict[int, tuple[int, int, int, int]] = {}
    for idx, (adapter, weight) in enumerate(adapters):
        check_mergeable(adapter)
        check_config_promises(adapter, adapter_layout(adapter.weights))
        if not math.isfinite(weight):
            raise OptionError(f"{adapter.folder}: adapter weight {weight} is not a finite number; give e.g. ADAPTER:0.5.")
        planner = _Planner(base, names, adapter, idx, float(weight))
        layout = adapter_layout(adapter.weights)
        routed = route_modules(base, names, adapter, layout)  # what peft's layer code merges (module_plan)
        planned = planner.plan_full(routed.full)  # base_layer copies first: later ops act on the saved base
        planned.sort(key=lambda step: step[1].kind != "base_layer")
        for module in routed.fast:
            planned += planner.plan_module(module)
        planned += [(t, MergeOp(**kw)) for t, kw in peft_module_ops(base, names, adapter, idx, float(weight), routed)]
        if adapter.config.peft_type == "VERA" and planner.vera_dims:
            planned, spec = planner.vera_shared(planned, layout.shared)
            if spec is not None:
                vera[idx] = spec
        if not planned and not layout.modules and not routed.peft:
            raise AdapterError(
                f"{adapter.folder}: the adapter holds no tensor surgeon recognizes as a {adapter.config.peft_type} "
                "factor or a saved module; it is empty or not a PEFT adapter."
            )
        for target, op in planned:
            steps.setdefault(target, []).append(op)
    targets = {name: tuple(steps[name]) for name in base.keys() if name in steps}
    return MergePlan(tuple(a for a, _ in adapters), tuple(float(w) for _, w in adapters), targets, vera)
