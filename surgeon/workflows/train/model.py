"""Build the trainable model of a `surgeon finetune` run and save it (full model or PEFT adapter)."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from surgeon.errors import AdapterError
from surgeon.io.adapter import Adapter
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import torch_dtype
from surgeon.workflows.train.methods import (
    nf4_quantization, peft_config, resolve_targets, uses_conv1d,
)
from surgeon.workflows.train.textmodel import head_modules, load_task_model

if TYPE_CHECKING:
    from surgeon.workflows.train.options import FinetuneOptions, Previous

_PEFT_PREFIX = "base_model.model."
_TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


@dataclass
class Built:
    """The model being trained and what is needed to save it."""

    model: Any
    method: str
    rank: int | None = None
    alpha: float | None = None
    targets: str | list[str] | None = None
    target_modules: int = 0
    notes: list[str] = field(default_factory=list)
    pissa_init: Path | None = None
    save_dtype: torch.dtype = torch.float32

    @property
    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters; 4-bit weights count as their unpacked size (peft's rule)."""
        if hasattr(self.model, "get_nb_trainable_parameters"):
            trainable, total = self.model.get_nb_trainable_parameters()
            return int(trainable), int(total)
        total = sum(p.numel() for p in self.model.parameters())
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad), total

    def save(self, folder: Path, tokenizer: Any) -> tuple[Path, dict[str, torch.Tensor]]:
        """Write the model with save_pretrained into ``folder`` (scratch); returns extra tensors to add."""
        if self.method == "full":
            self.model.to(self.save_dtype)
            self.model.save_pretrained(str(folder), safe_serialization=True)
            tokenizer.save_pretrained(str(folder))
            return folder, {}
        if self.pissa_init is not None:
            with warnings.catch_warnings():  # peft warns that PiSSA changed the base: the conversion undoes that
                warnings.simplefilter("ignore", UserWarning)
                self.model.save_pretrained(str(folder), path_initial_model_for_weight_conversion=str(self.pissa_init))
        else:
            self.model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        return folder, _missing_saved_modules(self.model, folder)


def _missing_saved_modules(model: Any, folder: Path) -> dict[str, torch.Tensor]:
    """modules_to_save tensors (the head) that peft's PiSSA conversion leaves out of the file."""
    from peft import get_peft_model_state_dict

    with Checkpoint.open(folder, prefix="adapter_model") as ckpt:
        have = set(ckpt.keys())
    state = get_peft_model_state_dict(model)
    return {k: v for k, v in state.items() if k not in have and ".lora_" not in k}


def _stored_float_dtype(folder: Path) -> torch.dtype:
    with Checkpoint.open(folder) as ckpt:
        counts = Counter(ckpt.info(n).dtype for n in ckpt.keys() if ckpt.info(n).dtype in ("F16", "BF16", "F32", "F64"))
    return torch_dtype(counts.most_common(1)[0][0]) if counts else torch.float32


def build_model(o: FinetuneOptions, base: Path, prev: Previous | None, labels: Any, tokenizer: Any,
                device: torch.device, scratch: Path) -> Built:
    """The model with only the method's parameters trainable (seeded: same seed, same init)."""
    labels = list(labels) if labels else None
    if o.method == "full":
        return _build_full(o, base, prev, labels, tokenizer, device)
    quantization = nf4_quantization() if o.method == "qlora" else None
    model, fresh = load_task_model(base, o.task, labels=labels, device=device, quantization=quantization,
                                   pad_token_id=tokenizer.pad_token_id)
    head = head_modules(model) if o.task == "classification" else []
    to_save = head + [m for m in fresh if not any(m == h or m.startswith(h + ".") for h in head)]
    notes = [f"initialized fresh and trained in full: {', '.join(to_save)}"] if to_save else []
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        notes.append("trained against a 4-bit NF4 base (bitsandbytes); the adapter is saved for the original base")
    if prev is not None:
        return _continue_adapter(o, model, prev, labels, to_save, head, notes)
    targets = resolve_targets(model, o.targets, base=o.base)
    config = peft_config(o.method, rank=int(o.rank or 0), alpha=float(o.alpha or 0), targets=targets,
                         modules_to_save=to_save, task_type=_TASK_TYPES[o.task],
                         fan_in_fan_out=uses_conv1d(model, targets.modules))
    torch.manual_seed(o.seed)
    peft_model = _wrap(model, config, o.base)
    built = Built(peft_model, o.method, o.rank, o.alpha, targets.peft_value, len(targets.modules), notes)
    if o.method == "pissa":
        built.pissa_init = _save_pissa_init(peft_model, scratch / "pissa_init")
        built.notes.append(f"PiSSA adapter saved converted for the original base: rank {2 * int(o.rank or 0)}, "
                           f"alpha {2 * float(o.alpha or 0):g} (peft's conversion)")
    return built


def _wrap(model: Any, config: Any, base_arg: str) -> Any:
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, TypeError) as exc:
        raise AdapterError(f"{base_arg}: peft cannot adapt this model ({str(exc).splitlines()[0]}); check --targets.") from None
    cfg = peft_model.peft_config["default"]
    if getattr(cfg, "modules_to_save", None):
        cfg.modules_to_save = list(dict.fromkeys(cfg.modules_to_save))
    cfg.base_model_name_or_path = base_arg
    return peft_model


def _save_pissa_init(peft_model: Any, folder: Path) -> Path:
    """The initial adapter peft needs to convert a trained PiSSA adapter for the original base."""
    cfg = peft_model.peft_config["default"]
    cfg.init_lora_weights = True  # so that loading the saved init does not run the SVD again
    peft_model.save_pretrained(str(folder))
    cfg.init_lora_weights = "pissa"
    return folder


def _build_full(o: FinetuneOptions, base: Path, prev: Previous | None, labels: list[str] | None,
                tokenizer: Any, device: torch.device) -> Built:
    source = prev.folder if prev is not None else base
    model, fresh = load_task_model(source, o.task, labels=labels, device=device, pad_token_id=tokenizer.pad_token_id)
    notes = []
    if prev is not None and o.task == "classification" and prev.labels != labels:
        for head in head_modules(model):
            _reinit(model, getattr(model, head), o.seed)
        notes.append(f"continued from {o.continue_from}; new labels, so the head was initialized fresh")
    elif fresh:
        notes.append(f"initialized fresh: {', '.join(fresh)}")
    model.requires_grad_(True)
    return Built(model, "full", notes=notes, save_dtype=_stored_float_dtype(source))


def _reinit(model: Any, module: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for sub in module.modules():
        model._init_weights(sub)


def _continue_adapter(o: FinetuneOptions, model: Any, prev: Previous, labels: list[str] | None,
                      to_save: list[str], head: list[str], notes: list[str]) -> Built:
    """Keep training the previous stage's adapter (same config and weights) on the new task."""
    from peft import PeftConfig, get_peft_model_state_dict, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(str(prev.folder))
    config.inference_mode = False
    config.modules_to_save = to_save or None
    config.base_model_name_or_path = None  # this stage's base is named below (no rename warning from peft)
    peft_model = _wrap(model, config, o.base)
    same_head = o.task != "classification" or prev.labels == labels
    state = get_peft_model_state_dict(peft_model)  # a fresh head stays as initialized
    with Adapter.open(prev.folder) as adapter:
        for key in adapter.weights.keys():
            module = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
            if not same_head and any(module.startswith(h + ".") for h in head):
                continue
            state[key] = adapter.weights.get(key)
    try:
        result = set_peft_model_state_dict(peft_model, state)
    except RuntimeError as exc:
        raise AdapterError(f"{prev.folder}: does not fit {o.base} ({str(exc).splitlines()[0]}); continue from a stage of this base.") from None
    if getattr(result, "unexpected_keys", None):
        raise AdapterError(f"{prev.folder}: tensors {result.unexpected_keys[:2]} do not fit {o.base}; continue from a stage of this base.")
    notes.append(f"continued from {o.continue_from} (stage {prev.stage})")
    if not same_head:
        notes.append("new labels, so the head was initialized fresh")
    rank = getattr(config, "r", None)
    alpha = getattr(config, "lora_alpha", None)
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules or [])
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = sum(1 for m in peft_model.modules() if isinstance(m, BaseTunerLayer))
    return Built(peft_model, o.method, rank, alpha, targets, count, notes)
