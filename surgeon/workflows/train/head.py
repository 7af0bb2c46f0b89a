"""`surgeon eval --head-from PATH`: a classification head taken from another checkpoint.

A task adapter trained on a bare base (or a merged model without a head) holds no classifier;
its head lives in the fine-tune that trained it, an adapter's ``modules_to_save`` tensors, or a
folder/file holding just the ``classifier.*`` / ``score.*`` tensors. :func:`read_head` finds
those tensors (names as transformers, peft's files or a bare dump spell them), their label count
and names; :func:`install_head` checks them against the built model and copies them in.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from surgeon.errors import CheckpointFormatError, NumericalError
from surgeon.io.adapter import Adapter, is_adapter_folder
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.resolve import resolve_path
from surgeon.workflows.train.textmodel import read_model_config, read_provenance

HEAD_MODULES = ("classifier", "score")  # transformers' sequence-classification heads
OUTPUT_LAYERS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")  # rows = labels
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class HeadSource:
    """Which head a classification eval used: ``via`` model | adapter | head-from; ``tensors`` the
    head's parameter names as the model spells them; ``labels`` its outputs' names."""

    source: str
    via: str
    tensors: list[str]
    labels: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class HeadTensors:
    """The head read from ``--head-from``: model parameter name -> float32 tensor."""

    source: Path
    tensors: dict[str, torch.Tensor]
    labels: list[str]


def normalize(key: str) -> str | None:
    """A stored head tensor's name as the model spells it ('classifier.weight'), or None when the key
    is not a head's (peft's ``original_module`` copy is never the trained head)."""
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX):]
    if ".original_module." in key:
        return None
    key = key.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
    return key if key.split(".", 1)[0] in HEAD_MODULES else None


def _open(path: Path) -> tuple[Checkpoint, Adapter | None]:
    if is_adapter_folder(path):
        adapter = Adapter.open(path)
        return adapter.weights, adapter
    return Checkpoint.open(path), None


def read_head(head_from: str | os.PathLike[str]) -> HeadTensors:
    """The ``classifier.*`` / ``score.*`` tensors of ``head_from`` (a model or adapter folder, a
    folder holding a .safetensors file, or the file itself) and its label names."""
    path = resolve_path(head_from)
    ckpt, adapter = _open(path)
    try:
        names = {n: k for k in ckpt.keys() if (n := normalize(k)) is not None}
        if not names:
            raise CheckpointFormatError(
                f"{path}: holds no classification head (no {', '.join(m + '.*' for m in HEAD_MODULES)} tensors); "
                "--head-from needs the fine-tuned model or adapter that finetune wrote, or a file with the head's tensors.")
        tensors = {n: ckpt.get(k, dtype=torch.float32) for n, k in sorted(names.items())}
        for n, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise NumericalError(f"{path}: head tensor {names[n]!r} holds NaN/Inf values; the head is corrupt "
                                     "or diverged: give the head of a finished fine-tune.")
    finally:
        (adapter or ckpt).close()
    outputs = [n for n in OUTPUT_LAYERS if n in tensors and tensors[n].dim() == 2]
    if len(outputs) != 1:
        raise CheckpointFormatError(
            f"{path}: the head tensors ({', '.join(sorted(tensors))}) have no single output layer "
            f"({' or '.join(OUTPUT_LAYERS)}, 2-D); give the head of one sequence-classification model.")
    count = int(tensors[outputs[0]].shape[0])
    return HeadTensors(path, tensors, _label_names(path, count))


def _label_names(folder: Path, count: int) -> list[str]:
    """The head's label names: surgeon provenance, else config.json's id2label, else 0..count-1."""
    root = folder if folder.is_dir() else folder.parent
    recorded = (read_provenance(root).get("report") or {}).get("labels")
    if isinstance(recorded, list) and len(recorded) == count:
        return [str(x) for x in recorded]
    if (root / "config.json").is_file():
        try:
            id2label = read_model_config(root).get("id2label") or {}
        except CheckpointFormatError:
            id2label = {}
        if len(id2label) == count:
            return [str(id2label[k]) for k in sorted(id2label, key=int)]
    return [str(i) for i in range(count)]


def refuse_own_head(model_path: Path) -> None:
    """``--head-from`` with a MODEL that has a head of its own is refused (which head would count?)."""
    with Checkpoint.open(model_path) as ckpt:
        own = [k for k in ckpt.keys() if normalize(k) is not None]
    if own:
        raise CheckpointFormatError(
            f"{model_path}: already has a trained classification head ({', '.join(own[:2])}); --head-from is for a "
            "bare base or a merged model without one: drop --head-from to use its own head.")


def check_labels(head: HeadTensors, adapter_path: Path | None, recorded: list[str] | None) -> list[str]:
    """The labels to evaluate with: the adapter's recorded ones when given (their count must be the
    head's), else the head's own."""
    if recorded is None:
        return head.labels
    if len(recorded) != len(head.labels):
        raise CheckpointFormatError(
            f"{head.source}: its head has {len(head.labels)} outputs but {adapter_path} was trained with "
            f"{len(recorded)} labels ({', '.join(recorded)}); give the head trained with this adapter.")
    return recorded


def install_head(model: Any, head: HeadTensors, *, model_path: Path) -> list[str]:
    """Copy ``head`` into the freshly built head of ``model`` (before any adapter wraps it); every
    parameter must be there with the model's shape. Returns the parameter names."""
    wanted = {n: p for n, p in model.named_parameters() if n.split(".", 1)[0] in HEAD_MODULES}
    missing = sorted(set(wanted) - set(head.tensors))
    extra = sorted(set(head.tensors) - set(wanted))
    if missing or extra:
        what = (f"lacks {', '.join(missing)}" if missing else "") + ("; " if missing and extra else "") + (
            f"has {', '.join(extra)} that {model_path}'s head does not" if extra else "")
        raise CheckpointFormatError(
            f"{head.source}: its head {what}; --head-from needs the head of a model of {model_path}'s architecture.")
    for name, param in wanted.items():
        found = head.tensors[name]
        if tuple(found.shape) != tuple(param.shape):
            raise CheckpointFormatError(
                f"{head.source}: head tensor {name!r} is {'x'.join(map(str, found.shape))} but {model_path} needs "
                f"{'x'.join(map(str, param.shape))}; --head-from needs a head trained on this base (same hidden size).")
    with torch.no_grad():
        for name, param in wanted.items():
            param.copy_(head.tensors[name].to(param.device, param.dtype))
    return sorted(wanted)
