"""The ``module`` route: every tensor of a module merged together, through peft's layer code.

When the first tensor of a module comes up in the base's order, all of that module's tensors are
read, every operation on any of them is applied in adapter order (``peft_module`` ones by
:func:`peft_layer.merge_module`, others by the fast path's ``apply_op``), and each is rounded
once to its output dtype. The module's other tensors wait, rounded, until the writer reaches
them: memory stays at one module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import torch_dtype
from surgeon.workflows.merge.module_plan import PEFT_MODULE
from surgeon.workflows.merge.plan import MergeOp, MergePlan
from surgeon.workflows.merge.routes import RoutePlan
from surgeon.workflows.merge.stream import TensorMerge, check_finite, tensor_entry

if TYPE_CHECKING:
    import torch


MODEL_WIDE_TYPES = {"TINYLORA", "UNILORA", "RANDLORA"}


def _natural(path: str) -> list[tuple[int, object]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in path.split(".")]


def _common_module(names: tuple[str, ...]) -> str:
    """The module holding all of ``names``: their longest common dotted prefix (the parent for one name)."""
    split = [n.split(".") for n in names]
    common: list[str] = []
    for parts in zip(*(p[:-1] for p in split)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


class ModuleMerges:
    """Module outputs computed once and handed out tensor by tensor."""

    def __init__(self, ckpt: Checkpoint, plan: MergePlan, routes: RoutePlan) -> None:
        self.ckpt, self.plan, self.routes = ckpt, plan, routes
        self.dtypes = {t.name: t.dtype for t in routes.tensors}
        self.ready: dict[str, tuple[torch.Tensor, TensorMerge]] = {}

    def tensor(self, name: str, dtype: str, entries: list[TensorMerge]) -> torch.Tensor:
        """``name`` merged and rounded to ``dtype``; its entry appended to ``entries``."""
        if name not in self.ready:
            self._merge_group(name)
        rounded, entry = self.ready.pop(name)
        entries.append(entry)
        return rounded

    def _group(self, name: str) -> tuple[list[str], list[tuple[str, MergeOp]]]:
        """The tensors merged together with ``name`` and every operation on them, in adapter order."""
        group, todo = [], [name]
        while todo:
            current = todo.pop()
            if current in group:
                continue
            group.append(current)
            for op in self.plan.targets.get(current, ()):
                todo += [n for n in op.group if n not in group]
        order = {n: i for i, n in enumerate(self.ckpt.keys())}
        group.sort(key=order.__getitem__)
        seen, steps = set(), []
        for tensor in group:
            for op in self.plan.targets.get(tensor, ()):
                key = (op.adapter, op.module) if op.kind == PEFT_MODULE else id(op)  # one per module, not per tensor
                if key not in seen:
                    seen.add(key)
                    steps.append((tensor, op))
        steps.sort(key=lambda step: step[1].adapter)  # stable: each adapter's own order is kept
        return group, steps

    def _joins(self, joint: list[MergeOp], op: MergeOp) -> bool:
        first = joint[0]
        kinds = {self.plan.adapters[o.adapter].config.peft_type for o in (*joint, op)}
        return op.kind == PEFT_MODULE and op.module == first.module and len(kinds) == 1 and \
            all(o.weight == 1.0 for o in (*joint, op)) and op.adapter not in {o.adapter for o in joint}

    def _siblings(self, op: MergeOp) -> dict[str, dict[str, tuple[int, ...]]] | None:
        """For tuners that number or size their parameters over all targeted modules: every module of the
        adapter (path -> {tensor: shape}), in the model's order (names sorted with numbers as numbers)."""
        if self.plan.adapters[op.adapter].config.peft_type not in MODEL_WIDE_TYPES:
            return None
        found: dict[str, dict[str, tuple[int, ...]]] = {}
        for ops in self.plan.targets.values():
            for other in ops:
                if other.kind == PEFT_MODULE and other.adapter == op.adapter and other.module not in found:
                    base = _common_module(other.group)
                    found[other.module] = {n[len(base) + 1:]: tuple(self.ckpt.info(n).shape) for n in other.group}
        return {p: found[p] for p in sorted(found, key=_natural)}

    def _merge_group(self, name: str) -> None:
        import torch

        from surgeon.ops.merge_rounding import round_merged
        from surgeon.workflows.merge.apply import apply_op
        from surgeon.workflows.merge.oft_fast import merge_oft_linear
        from surgeon.workflows.merge.peft_layer import merge_module

        group, steps = self._group(name)
        stored = {n: self.ckpt.get(n) for n in group}
        current = {n: t.float() for n, t in stored.items()}
        unmerged = dict(current)
        base_config = self.ckpt.config() or {}
        cpu = torch.device("cpu")
        i = 0
        while i < len(steps):
            tensor, op = steps[i]
            if op.kind != PEFT_MODULE:
                current[tensor], unmerged[tensor] = apply_op(self.plan, op, current[tensor], unmerged[tensor], cpu)
                i += 1
                continue
            joint = [op]  # adapters on the same module merge together, as peft merges several active adapters
            while i + len(joint) < len(steps) and self._joins(joint, steps[i + len(joint)][1]):
                joint.append(steps[i + len(joint)][1])
            base = _common_module(op.group)
            fast = merge_oft_linear(self.plan, joint, base, current, base_config=base_config,
                                    threads=self.routes.workers)  # OFT block by block, peft's bits; else None
            current.update(fast if fast is not None else merge_module(
                self.plan, joint, base, current, unmerged, base_config=base_config, siblings=self._siblings(op),
                threads=self.routes.workers))
            i += len(joint)
        for n in group:
            dtype = self.dtypes[n]
            rounded, stats = round_merged(stored[n], torch_dtype(dtype), merged=current[n], workers=self.routes.workers)
            check_finite(self.plan, n, dtype, stats)
            self.ready[n] = (rounded, tensor_entry(n, self.plan, dtype, stats, "module"))
