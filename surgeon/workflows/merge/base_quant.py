"""``merge --base-quant nf4|fp4``: merge a QLoRA adapter onto the base it was trained against.

A QLoRA adapter learned its ΔW against the 4-bit NF4/FP4 base that bitsandbytes dequantizes on the fly,
not against the bf16/fp32 weights. With ``--base-quant``, every weight bitsandbytes would have quantized
(the 2-D weights of linear layers: not embeddings, not the output head, not norms or biases, not the
modules in ``llm_int8_skip_modules``) goes through the same quantize-dequantize round trip
(:func:`surgeon.ops.quant.roundtrip_4bit`) before the adapters' ΔW is added; tensor by tensor, as every
merge. The precision report gives each such tensor's ‖dequant(W) − W‖ beside ‖ΔW‖.

Without the option, the adapter's recorded quantization config decides (``quantization_config`` in
adapter_config.json, or in a config.json saved beside it, as trainers such as axolotl or unsloth write
it), and the report says so; ``--base-quant none`` turns it off.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from surgeon.errors import AdapterError, OptionError
from surgeon.io.adapter import ADAPTER_CONFIG, Adapter
from surgeon.io.checkpoint import Checkpoint
from surgeon.workflows.merge.plan import CONV1D_MODEL_TYPES, MergeOp, MergePlan

if TYPE_CHECKING:
    import torch

# torch (and surgeon.ops.quant) only when a tensor is rounded: planning stays torch-free, as the native path.
QUANT_TYPES = ("nf4", "fp4")
DEFAULT_BLOCKSIZE = 64  # bitsandbytes' 4-bit block, the one transformers' 4-bit loading uses
CHOICES = (*QUANT_TYPES, "none")
KIND = "base_quant"
# Weights bitsandbytes leaves in full precision: embeddings, output heads (transformers skips the output
# embedding and task heads when it converts a model to 4 bits). Module names containing the first, or
# equal to one of the second.
_KEPT_PARTS = ("embed",)
_KEPT_NAMES = ("wte", "wpe", "lm_head", "score", "classifier", "qa_outputs", "shared")


@dataclass(frozen=True)
class BaseQuant:
    """The 4-bit round trip to apply: ``quant_type`` nf4/fp4, ``blocksize``, ``double_quant``; ``skip``:
    module names kept in full precision; ``source``: where the choice came from (for the report)."""

    quant_type: str
    blocksize: int = DEFAULT_BLOCKSIZE
    double_quant: bool = False
    skip: tuple[str, ...] = ()
    source: str = "--base-quant"

    def note(self) -> str:
        what = f"{self.quant_type}{' with double quantization' if self.double_quant else ''}, blocks of {self.blocksize}"
        return (f"base weights rounded through bitsandbytes' 4-bit {what} before merging ({self.source}); "
                "pass --base-quant none to merge onto the unquantized weights")


def _recorded(adapter: Adapter) -> tuple[dict[str, Any], str] | None:
    """The adapter's recorded bitsandbytes 4-bit config and the file it came from, if it has one."""
    places = [(adapter.config.raw, adapter.folder / ADAPTER_CONFIG)]
    side = adapter.folder / "config.json"
    if side.is_file():
        try:
            places.append((json.loads(side.read_text("utf-8")), side))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
    for raw, path in places:
        quant = raw.get("quantization_config") if isinstance(raw, dict) else None
        if isinstance(quant, dict) and (quant.get("load_in_4bit") or quant.get("bnb_4bit_quant_type")):
            return quant, str(path)
    return None


def resolve_base_quant(option: str | None, adapters: Sequence[Adapter]) -> BaseQuant | None:
    """The round trip for ``option`` (nf4, fp4, none, or None: from the adapters' recorded config)."""
    if option is not None and option not in CHOICES:
        raise OptionError(f"--base-quant {option!r} is not one of {', '.join(CHOICES)}.")
    if option == "none":
        return None
    recorded = next((r for r in map(_recorded, adapters) if r is not None), None)
    quant, where = recorded if recorded else ({}, "")
    kind = option or str(quant.get("bnb_4bit_quant_type") or "nf4")
    if kind not in QUANT_TYPES:
        raise AdapterError(f"{where}: quantization_config.bnb_4bit_quant_type is {kind!r}, expected nf4 or fp4; "
                           "give --base-quant nf4|fp4 or --base-quant none.")
    if option is None and not recorded:
        return None
    skip = quant.get("llm_int8_skip_modules") or ()
    source = "--base-quant" if option else f"from quantization_config in {where}"
    return BaseQuant(kind, DEFAULT_BLOCKSIZE, bool(quant.get("bnb_4bit_use_double_quant")),
                     tuple(str(s) for s in skip), source)


def quantized(name: str, shape: Sequence[int], dtype: str, spec: BaseQuant) -> bool:
    """Whether bitsandbytes quantizes base tensor ``name``: a 2-D float weight outside embeddings/heads."""
    if len(shape) != 2 or not name.endswith(".weight") or dtype not in ("F32", "F16", "BF16"):
        return False
    parts = name.split(".")[:-1]
    if any(k in p for p in parts for k in _KEPT_PARTS) or any(p in _KEPT_NAMES for p in parts):
        return False
    return not any(s in parts or ".".join(parts).endswith(s) for s in spec.skip)


def with_base_quant(plan: MergePlan, base: Checkpoint, spec: BaseQuant | None) -> MergePlan:
    """``plan`` with a base_quant step first on every tensor bitsandbytes quantizes (touched by an adapter
    or not: the adapter was trained with all of them rounded)."""
    if spec is None:
        return plan
    conv1d = (base.config() or {}).get("model_type") in CONV1D_MODEL_TYPES
    targets: dict[str, tuple[MergeOp, ...]] = {}
    for name in base.keys():
        info = base.info(name)
        ops = plan.targets.get(name, ())
        if quantized(name, info.shape, info.dtype, spec) and not any(o.kind in ("replace", "base_layer") for o in ops):
            # GPT-2's Conv1D weights are stored (in × out); transformers quantizes them transposed, as a Linear
            step = MergeOp(KIND, 0, name, {"quant_type": spec.quant_type, "dtype": info.dtype},
                           features=(spec.blocksize, int(spec.double_quant)), fan_in_fan_out=conv1d)
            ops = (step, *ops)
        if ops:
            targets[name] = ops
    return replace(plan, targets=targets)


def apply_base_quant(plan: MergePlan, op: MergeOp, weight: torch.Tensor) -> torch.Tensor:
    """W (float32, as stored widened) -> dequant(quant(W)) as float32; records ‖dequant(W) − W‖ in the plan."""
    import torch

    from surgeon.io.format import torch_dtype
    from surgeon.ops.quant import quantization_error, roundtrip_4bit

    stored = weight.to(torch_dtype(op.tensors["dtype"]))
    as_linear = stored.T if op.fan_in_fan_out else stored
    out = roundtrip_4bit(as_linear, op.tensors["quant_type"], blocksize=op.features[0],
                         double_quant=bool(op.features[1])).to(torch.float32)
    out = out.T.contiguous() if op.fan_in_fan_out else out
    plan._cache[(KIND, op.module)] = quantization_error(weight, out)
    return out


def quant_error(plan: MergePlan, name: str) -> float | None:
    """‖dequant(W) − W‖ of base tensor ``name`` when the merge rounded it, else None."""
    value = plan._cache.get((KIND, name))
    return None if value is None else float(value)
