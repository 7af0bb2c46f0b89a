"""Executing a merge plan on one tensor: W' in float32 from the stored W and the adapter factors.

Dispatches each :class:`MergeOp` to the pure math in ``surgeon.ops`` (float32, on the
chosen device). Large per-tensor intermediates (a LoRA's B·A) can go into reusable
:class:`Scratch` buffers, so that streaming a model does not page-fault fresh memory for
every tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from surgeon.errors import UnsupportedAdapterError
from surgeon.io.checkpoint import Checkpoint
from surgeon.ops import lora, lycoris
from surgeon.workflows.merge import base_quant
from surgeon.workflows.merge.plan import MergeOp, MergePlan
from surgeon.workflows.merge.routes import ADDITIVE

__all__ = ["ADDITIVE", "Scratch", "additive_delta", "apply_op", "apply_ops", "factor", "merge_one"]


class Scratch:
    """Reusable buffers by slot: ``get(slot, shape)`` is a view of a buffer grown as needed."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[object, torch.dtype, str], torch.Tensor] = {}

    def get(self, slot: object, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> torch.Tensor:
        key = (slot, dtype, str(device))
        numel = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)


def factor(plan: MergePlan, op: MergeOp, role: str, device: torch.device) -> torch.Tensor:
    return plan.adapters[op.adapter].weights.get(op.tensors[role], dtype=torch.float32, device=device)


def _vera_shared(plan: MergePlan, op: MergeOp, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if "vera_A" in op.tensors:
        return factor(plan, op, "vera_A", device), factor(plan, op, "vera_B", device)
    key = ("vera", op.adapter, str(device))
    if key not in plan._cache:
        vera_A, vera_B = lora.vera_projection(*plan.vera_projections[op.adapter])
        plan._cache[key] = (vera_A.to(device), vera_B.to(device))
    return plan._cache[key]


def additive_delta(plan: MergePlan, op: MergeOp, shape: torch.Size, device: torch.device,
                   scratch: Scratch | None = None, slot: object = None) -> torch.Tensor | tuple[torch.Tensor, float]:
    """ΔW of the additive kinds (W' = W + ΔW), float32 in the base's layout.

    With ``scratch``, a LoRA's B·A goes into the reusable buffer ``slot`` (valid until that slot is
    used again) and, for a Linear, comes back unscaled as ``(B·A, s)`` for the caller to scale in
    cache-sized pieces (``round_merged`` does).
    """
    f = lambda role: factor(plan, op, role, device)  # noqa: E731
    k = op.kind
    if k == "lora":
        lora_A, lora_B = f("lora_A"), f("lora_B")
        if scratch is None:
            return lora.lora_delta(lora_A, lora_B, op.scaling, fan_in_fan_out=op.fan_in_fan_out)
        out = scratch.get(slot, (lora_B.shape[0], lora_A.shape[1]), device=device)
        if op.fan_in_fan_out:
            return lora.lora_delta(lora_A, lora_B, op.scaling, fan_in_fan_out=True, out=out)
        return torch.matmul(lora_B, lora_A, out=out), op.scaling
    if k == "lora_embedding":
        return lora.lora_embedding_delta(f("lora_embedding_A"), f("lora_embedding_B"), op.scaling)
    if k == "lora_bias":
        return f("lora_B_bias") * op.scaling
    if k == "adalora":
        return lora.adalora_delta(f("lora_A"), f("lora_B"), f("lora_E"), op.scaling, op.ranknum,
                                  fan_in_fan_out=op.fan_in_fan_out)
    if k == "loha":
        return lycoris.loha_delta(f("hada_w1_a"), f("hada_w1_b"), f("hada_w2_a"), f("hada_w2_b"), op.scaling,
                                  tuple(shape))
    if k == "lokr":
        w1 = f("lokr_w1") if "lokr_w1" in op.tensors else f("lokr_w1_a") @ f("lokr_w1_b")
        w2 = f("lokr_w2") if "lokr_w2" in op.tensors else f("lokr_w2_a") @ f("lokr_w2_b")
        return lycoris.lokr_delta(w1, w2, op.scaling, tuple(shape))
    if k == "vera":
        vera_A, vera_B = _vera_shared(plan, op, device)
        delta = lora.vera_delta(vera_A, vera_B, f("vera_lambda_b"), f("vera_lambda_d"), out_features=op.features[0],
                                in_features=op.features[1], fan_in_fan_out=op.fan_in_fan_out)
        return delta if op.weight == 1.0 else delta * op.weight
    raise UnsupportedAdapterError(f"internal: unknown merge operation {k!r}")


def apply_op(plan: MergePlan, op: MergeOp, weight: torch.Tensor, unmerged: torch.Tensor,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One operation: (W merged so far, unmerged W₀) -> (new W, new W₀)."""
    f = lambda role: factor(plan, op, role, device)  # noqa: E731
    k = op.kind
    if k == base_quant.KIND:  # the 4-bit round trip of a QLoRA base: the new W and W₀ both
        rounded = base_quant.apply_base_quant(plan, op, weight)
        return rounded, rounded
    if k in ("base_layer", "replace"):
        new = f("tensor")
        if k == "replace" and op.weight != 1.0:  # a weighted modules_to_save moves part of the way
            new = weight + op.weight * (new - weight)
        return new, new
    if k in ("ia3", "ia3_bias"):
        vec = lora.ia3_vector(f("ia3_l"), op.weight)
        if k == "ia3_bias":
            return lora.ia3_bias(weight, vec), unmerged
        return lora.ia3_merge(weight, vec, fan_in_fan_out=op.fan_in_fan_out), unmerged
    if k in ("dora", "dora_embedding"):
        emb = k == "dora_embedding"
        delta = (lora.lora_embedding_delta(f("lora_embedding_A"), f("lora_embedding_B"), op.scaling) if emb
                 else lora.lora_delta(f("lora_A"), f("lora_B"), op.scaling, fan_in_fan_out=op.fan_in_fan_out))
        return lora.dora_merge(weight, unmerged, delta, f("magnitude"), fan_in_fan_out=op.fan_in_fan_out,
                               embedding=emb), unmerged
    if k in _HIRA:
        return _hira_group(plan, [op], weight, unmerged, device), unmerged
    delta = additive_delta(plan, op, weight.shape, device)  # without scratch: already scaled
    return weight + (delta[0] * delta[1] if isinstance(delta, tuple) else delta), unmerged


def merge_one(base: Checkpoint, plan: MergePlan, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' float32, W as stored) for one base tensor, both on ``device``."""
    stored = base.get(name, device=device)
    weight = stored.float()
    unmerged = weight
    weight, _ = apply_ops(plan, plan.targets.get(name, ()), weight, unmerged, device)
    return weight, stored


_HIRA = ("hira", "hira_embedding")


def apply_ops(plan: MergePlan, ops: Sequence[MergeOp], weight: torch.Tensor, unmerged: torch.Tensor,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_op` for each operation in order, except that a run of HiRA operations (several HiRA
    adapters on one tensor) is merged in one step, as peft merges them: W + W₀ ⊙ (0 + ΔW₁ + ΔW₂ + ...).
    Saved copies of the frozen base (``base_layer``) come first, whichever adapter holds them: peft loads
    every adapter before it merges any."""
    ops = sorted(ops, key=lambda op: op.kind != "base_layer")
    i = 0
    while i < len(ops):
        j = i + 1
        if ops[i].kind in _HIRA:
            while j < len(ops) and ops[j].kind == ops[i].kind:
                j += 1
            weight = _hira_group(plan, ops[i:j], weight, unmerged, device)
        else:
            weight, unmerged = apply_op(plan, ops[i], weight, unmerged, device)
        i = j
    return weight, unmerged


def _hira_group(plan: MergePlan, ops: Sequence[MergeOp], weight: torch.Tensor, unmerged: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """peft's HiRA merge of these adapters: their B·A summed into zeros (each times its weight), then
    W + W₀ ⊙ sum (W₀ the unmerged base)."""
    total = torch.zeros_like(weight)
    for op in ops:
        emb = op.kind == "hira_embedding"
        roles = ("hira_embedding_A", "hira_embedding_B") if emb else ("hira_A", "hira_B")
        delta = lora.hira_delta(factor(plan, op, roles[0], device), factor(plan, op, roles[1], device),
                                fan_in_fan_out=op.fan_in_fan_out, embedding=emb)
        total += delta if op.weight == 1.0 else delta * op.weight
    return lora.hira_merge(weight, unmerged, total)


