"""An OFT module on a Linear layer merged block by block, with peft's bits.

peft's OFT merge is ``W <- (R W^T)^T`` with R the dense block diagonal of the rotation blocks; the
rotation blocks are :func:`surgeon.ops.oft.rotation_blocks` (Cayley or Cayley-Neumann, ``coft``'s
projection; ``block_share`` repeats one block), in peft's order of operations, so without importing
peft (seconds of start-up), and the product is :func:`surgeon.ops.oft.rotate_blocks`,
which takes the block route only where it is measured to give the dense product's bits. Anything
else (several adapters at once, GPT-2 Conv1D / fan_in_fan_out, embeddings, convolutions, trained
biases, a shape or value the block route does not reproduce) returns None: peft's layer code then
merges the module as before.
"""

from __future__ import annotations

from typing import Any

import torch

from surgeon.ops.oft import rotate_blocks, rotation_blocks
from surgeon.workflows.merge.plan import CONV1D_MODEL_TYPES, MergeOp, MergePlan

_ROLE = "oft_R.weight"


def _blocks(raw: dict[str, Any], saved: torch.Tensor, size: int, features: int) -> torch.Tensor | None:
    """The (features / size) rotation blocks peft's merge multiplies by, from the saved ``oft_R.weight``
    and the adapter's config (peft's defaults where a key is missing)."""
    blocks = rotation_blocks(saved, size, coft=bool(raw.get("coft", False)), eps=float(raw.get("eps", 6e-5)),
                             neumann=bool(raw.get("use_cayley_neumann", True)),
                             terms=int(raw.get("num_cayley_neumann_terms", 5)))
    if raw.get("block_share"):
        blocks = blocks.expand(features // size, size, size)
    return blocks.contiguous() if blocks.shape[0] * size == features else None


def _block_size(elements: int) -> int:
    size = int(round((1 + (1 + 8 * elements) ** 0.5) / 2))
    return size if size * (size - 1) // 2 == elements else 0


def merge_oft_linear(plan: MergePlan, ops: list[MergeOp], base_module: str, current: dict[str, torch.Tensor], *,
                     base_config: dict[str, Any], threads: int) -> dict[str, torch.Tensor] | None:
    """The module's base tensors (float32) after peft's OFT merge, computed block by block; None where this
    module is not a plain single-adapter OFT Linear whose block product is known to match peft's."""
    from surgeon.workflows.merge.peft_layer import _EMBEDDING_NAMES

    if len(ops) != 1:
        return None
    op = ops[0]
    adapter = plan.adapters[op.adapter]
    raw = adapter.config.raw
    rel = {n[len(base_module) + 1:]: n for n in op.group}
    if adapter.config.peft_type != "OFT" or set(op.tensors) != {_ROLE} or not {"weight"} <= set(rel) <= \
            {"weight", "bias"} or raw.get("fan_in_fan_out") or base_config.get("model_type") in CONV1D_MODEL_TYPES \
            or op.module.rsplit(".", 1)[-1] in _EMBEDDING_NAMES:
        return None
    weight, saved = current[rel["weight"]], adapter.weights.get(op.tensors[_ROLE])
    if weight.dim() != 2 or saved.dim() != 2 or not saved.is_floating_point():
        return None
    out, features = weight.shape
    size = _block_size(saved.shape[1])
    if size < 2 or features % size or saved.shape[0] != (1 if raw.get("block_share") else features // size):
        return None
    blocks = _blocks(raw, saved.float(), size, features)
    merged = None if blocks is None else rotate_blocks(weight.float(), blocks, threads=threads)
    if merged is None:
        return None
    result = {n: current[n] for n in rel.values()}
    name = rel["weight"]
    result[name] = merged if op.weight == 1.0 else current[name] + op.weight * (merged - current[name])
    return result
