"""Embedding layouts LLM adapters bring: added tokens (resized embeddings) and tied input/output embeddings.

- **Added tokens.** An adapter trained after ``resize_token_embeddings`` saves its ``embed_tokens`` /
  ``lm_head`` whole (``modules_to_save`` or peft's saved embedding layers) with more rows than the base.
  The merge takes those tensors as the base's (same name, the adapter's rows) and sets ``vocab_size`` in
  config.json to the new row count.
- **Tied embeddings.** In a model with ``tie_word_embeddings`` the checkpoint stores only the input
  embedding, and ``lm_head`` reads it. An adapter that changes one side (a LoRA on ``lm_head``, or on
  ``embed_tokens``, or a ``modules_to_save`` copy of either) leaves the other side as it was in the
  unmerged model, so the merged model must keep both: ``lm_head.weight`` is written as its own tensor
  (the original embedding, or the embedding with the lm_head change), and config.json says
  ``tie_word_embeddings: false``, as peft's ``merge_and_unload`` does when the two stop being one.
  (Trainable tokens on a tied model change both sides alike in peft: nothing to untie.)

Both are a view of the base :class:`Checkpoint` in which a name points at other bytes: a resized
tensor at the adapter file's span, ``lm_head.weight`` at the embedding's. Planning, routing and writing
then treat them as ordinary base tensors; nothing is copied to disk first.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from surgeon.errors import AdapterError
from surgeon.io.adapter import Adapter, BaseNames, adapter_layout
from surgeon.io.checkpoint import Checkpoint

HEAD = "lm_head.weight"  # the output embedding's name when an untied model stores it
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "shared")
OUTPUT_HEADS = ("lm_head", "embed_out")
_UNTIE_ROLES = ("lora_A", "lora_embedding_A", "hira_A", "hira_embedding_A", "hada_w1_a", "lokr_w1", "lokr_w1_a",
                "vera_lambda_b", "ia3_l", "lora_E")


@dataclass(frozen=True)
class VocabChanges:
    """What :func:`prepare` changed: the config.json keys to set, a note per change for the report, and the
    base's own dtype of each resized tensor (the output keeps it unless --dtype says otherwise)."""

    config: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    dtypes: dict[str, str] = field(default_factory=dict)


def _module_kind(path: str) -> str | None:
    last = path.split(".")[-1]
    if last in INPUT_EMBEDDINGS:
        return "input"
    if last in OUTPUT_HEADS:
        return "output"
    return None


def _input_embedding(base: Checkpoint) -> str | None:
    names = BaseNames(base.keys())
    for part in INPUT_EMBEDDINGS:
        found = names.resolve(f"{part}.weight", what=str(base.root))
        if found:
            return found
    return None


def _ties(base: Checkpoint) -> bool:
    config = base.config() or {}
    return bool(config.get("tie_word_embeddings", True)) and not any(
        k.split(".")[-2] in OUTPUT_HEADS for k in base.keys() if k.endswith(".weight") and "." in k)


def _has_head(base: Checkpoint, sides: set[str]) -> bool:
    """Whether the model reads the tied embedding as ``lm_head``: a causal LM (or an adapter on lm_head)."""
    archs = (base.config() or {}).get("architectures") or []
    return "output" in sides or any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _touched(adapters: Sequence[Adapter]) -> set[str]:
    """Which embedding sides ("input", "output") an adapter changes with a factor or a saved copy."""
    sides = set()
    for adapter in adapters:
        layout = adapter_layout(adapter.weights)
        for module in layout.modules.values():
            kind = _module_kind(module.path)
            if kind and any(role in module.tensors for role in _UNTIE_ROLES):
                sides.add(kind)
        for full in layout.full:
            kind = _module_kind(full.name.rsplit(".", 1)[0])
            if kind and not full.base_layer_copy:
                sides.add(kind)
    return sides


def _resized(base: Checkpoint, adapters: Sequence[Adapter]) -> dict[str, tuple[Adapter, str]]:
    """Base embedding/head tensors an adapter saves whole with more rows: base name -> (adapter, tensor)."""
    names = BaseNames(base.keys())
    out: dict[str, tuple[Adapter, str]] = {}
    for adapter in adapters:
        for full in adapter_layout(adapter.weights).full:
            if _module_kind(full.name.rsplit(".", 1)[0]) is None or not full.name.endswith(".weight"):
                continue
            target = names.resolve(full.name, what=str(adapter.folder))
            tied_head = target is None and _module_kind(full.name.rsplit(".", 1)[0]) == "output" and _ties(base)
            if tied_head:  # a saved head of a tied model: it becomes the untied lm_head
                target = _input_embedding(base)
            if target is None:
                continue
            got, have = adapter.weights.info(full.source).shape, base.info(target).shape
            if len(got) == 2 and len(have) == 2 and got[1] == have[1] and got[0] > have[0]:
                previous = out.get(target)
                if previous and adapter.weights.info(previous[1]).shape != got:
                    raise AdapterError(f"{adapter.folder}: {full.source!r} resizes {target!r} to {got[0]} rows, "
                                       f"another adapter to {adapter.weights.info(previous[1]).shape[0]}; merge "
                                       "adapters trained with the same vocabulary.")
                out[HEAD if tied_head else target] = (adapter, full.source)
    return out


def prepare(base: Checkpoint, adapters: Sequence[Adapter]) -> tuple[Checkpoint, VocabChanges]:
    """The base as the adapters need it (resized embeddings, an untied ``lm_head``) and what changed."""
    resized = _resized(base, adapters)
    embedding = _input_embedding(base)
    sides = _touched(adapters)
    untie = bool(embedding) and bool(sides) and _ties(base) and _has_head(base, sides)
    if not resized and not untie:
        return base, VocabChanges()
    tensors = dict(base.tensors)
    notes, config = [], {}
    for name, (adapter, source) in resized.items():
        info = adapter.weights.info(source)
        rows = base.info(embedding if name == HEAD and name not in base else name).shape[0]
        tensors[name] = replace(info, name=name)  # the adapter's bytes under the base's name
        config["vocab_size"] = info.shape[0]
        notes.append(f"{name} resized from {rows} to {info.shape[0]} rows (added tokens, from {adapter.folder}); "
                     f"config.json vocab_size = {info.shape[0]}")
    if untie:
        head = HEAD
        if embedding in resized and head not in resized:
            raise AdapterError(
                f"{resized[embedding][0].folder}: the adapter saves {embedding} resized to "
                f"{tensors[embedding].shape[0]} rows, and in the model it was trained on the tied {head} kept that "
                "model's own new rows, which the adapter does not hold. Merge onto the resized base the adapter "
                "was trained on (the base after resize_token_embeddings, saved with save_pretrained)."
            )
        ordered = {}
        for name, info in tensors.items():
            if name == head:
                continue
            ordered[name] = info
            if name == embedding:
                ordered[head] = tensors.get(head) or replace(base.info(embedding), name=head)
        tensors = ordered
        config["tie_word_embeddings"] = False
        notes.append(f"untied {head} from {embedding}: the adapter changes one side only, so both are written "
                     "(tie_word_embeddings: false in config.json), as peft's merge_and_unload does")
    view = copy.copy(base)  # same files and descriptors; a name table of its own
    view.tensors = tensors
    return view, VocabChanges(config, tuple(notes), {n: base.info(n).dtype for n in resized})


def patch_config(base: Checkpoint, files: list[Path], texts: dict[str, str], changes: VocabChanges
                 ) -> tuple[list[Path], dict[str, str]]:
    """config.json with ``changes.config`` set (written as text instead of copied)."""
    if not changes.config:
        return files, texts
    if "config.json" in texts:
        config = json.loads(texts["config.json"])
    else:
        config = base.config()
        if config is None:
            return files, texts
    config.update(changes.config)
    if "text_config" in config and isinstance(config["text_config"], dict) and "vocab_size" in changes.config:
        config["text_config"]["vocab_size"] = changes.config["vocab_size"]
    return ([f for f in files if f.name != "config.json"],
            {**texts, "config.json": json.dumps(config, indent=2) + "\n"})
