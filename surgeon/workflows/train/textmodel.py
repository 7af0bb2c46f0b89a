"""Shared by `finetune` and `eval`: load transformers models and tokenizers, batch text, measure memory.

Models are loaded from local safetensors folders only (``use_safetensors=True``:
pickle weights are never read) and computed in float32.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgeon.workflows.device import pick_device  # noqa: F401 - re-exported for callers
from surgeon.errors import CheckpointFormatError
from surgeon.io.adapter import is_adapter_folder
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.data import Example
from surgeon.io.textfile import check_regular

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
IGNORE_INDEX = -100


def quiet_transformers() -> None:
    """Silence transformers/peft load reports and their own progress bars (surgeon shows its own)."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def read_model_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder; refuses adapters and folders without weights."""
    if is_adapter_folder(folder):
        raise CheckpointFormatError(
            f"{folder}: is a PEFT adapter, not a model; give the base model here and the adapter with --adapter."
        )
    with Checkpoint.open(folder):  # validates the safetensors and refuses pickle weights
        pass
    config_path = folder / "config.json"
    check_regular(config_path, what="config.json", error=CheckpointFormatError)
    if not folder.is_dir() or not config_path.is_file():
        raise CheckpointFormatError(
            f"{folder}: no config.json; transformers needs the model folder that save_pretrained() wrote."
        )
    try:
        return json.loads(config_path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{config_path}: not valid JSON ({exc}); re-download or re-save the model.") from None


def is_decoder_config(config: dict[str, Any]) -> bool:
    """True for causal LMs (GPT-2, Llama, ...), False for encoders (BERT, RoBERTa, ...)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    model_type = config.get("model_type")
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_tokenizer(*folders: Path) -> Any:
    """The tokenizer of the first folder that has one; pad token set (falls back to EOS/UNK)."""
    from transformers import AutoTokenizer

    for folder in folders:
        if folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES):
            for name in TOKENIZER_FILES:  # transformers would wait on a FIFO forever
                check_regular(folder / name, what="tokenizer file", error=CheckpointFormatError)
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                raise CheckpointFormatError(
                    f"{folder}: its tokenizer files do not load ({str(exc).splitlines()[0]}); "
                    "copy the base model's tokenizer files into it."
                ) from None
            if tokenizer.pad_token is None:
                fallback = tokenizer.eos_token or tokenizer.unk_token
                if fallback is None:
                    raise CheckpointFormatError(f"{folder}: the tokenizer has no pad, EOS or UNK token to pad batches with; add a pad token.")
                tokenizer.pad_token = fallback
            return tokenizer
    names = ", ".join(str(f) for f in folders)
    raise CheckpointFormatError(
        f"{names}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); "
        "copy the base model's tokenizer files into the model folder."
    )


def module_of(key: str) -> str:
    """'bert.pooler.dense.weight' -> 'bert.pooler.dense'."""
    return key.rsplit(".", 1)[0]


def load_task_model(
    folder: Path, task: str, *, labels: Sequence[str] | None, device: torch.device,
    quantization: Any = None, kind: str | None = None, pad_token_id: int | None = None,
) -> tuple[Any, list[str]]:
    """A transformers model for ``task`` (float32) and the modules it had to initialize fresh.

    ``kind`` overrides the head: "classification", "causal-lm", "masked-lm" or "encoder".
    """
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    kind = kind or task
    extra: dict[str, Any] = {}
    if kind == "classification":
        labels = list(labels or ())
        extra["config"] = AutoConfig.from_pretrained(
            str(folder), num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)})
        extra["ignore_mismatched_sizes"] = True
    cls = {"classification": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM,
           "masked-lm": AutoModelForMaskedLM, "encoder": AutoModel}[kind]
    if quantization is not None:
        extra["quantization_config"] = quantization
        extra["device_map"] = {"": str(device)}
    try:
        model, info = cls.from_pretrained(str(folder), use_safetensors=True, dtype=torch.float32,
                                          output_loading_info=True, **extra)
    except (ValueError, KeyError) as exc:
        raise CheckpointFormatError(
            f"{folder}: transformers cannot build a {kind} model from it ({str(exc).splitlines()[0]}); "
            "check that the model type supports this task."
        ) from None
    fresh = {module_of(k) for k in info.get("missing_keys", ())}
    fresh |= {module_of(item[0]) for item in info.get("mismatched_keys", ())}
    if quantization is None:
        model.to(device)
    if getattr(model.config, "pad_token_id", None) is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # sequence classification finds the last token by it
    return model, sorted(fresh)


def head_modules(model: Any) -> list[str]:
    """Names of the task head modules with parameters (e.g. ['classifier'] or ['score'])."""
    backbone = model.base_model
    return [name for name, child in model.named_children()
            if child is not backbone and any(True for _ in child.parameters())]


# -- batching ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoded:
    """Pre-tokenized examples: token id lists, and per-token labels for language modelling."""

    input_ids: list[list[int]]
    labels: list[list[int]] | list[int]
    token_type_ids: bool


def encode_texts(tokenizer: Any, texts: Sequence[str], label_ids: Sequence[int], max_length: int, *,
                 token_types: bool) -> Encoded:
    """Texts with the tokenizer's special tokens; ``label_ids`` one class index per text (or empty)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return Encoded(list(enc["input_ids"]), list(label_ids), token_types)


def encode_causal(tokenizer: Any, examples: Sequence[Example], max_length: int) -> Encoded:
    """bos? + prompt + completion + eos?, labels IGNORE_INDEX on bos and prompt tokens."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids, labels = [], []
    for e in examples:
        if e.prompt is not None and e.completion is not None:
            prompt = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
            body = tokenizer(e.completion, add_special_tokens=False)["input_ids"] + eos
        else:
            prompt, body = [], tokenizer(e.text, add_special_tokens=False)["input_ids"] + eos
        seq = (bos + prompt + body)[:max_length]
        lab = ([IGNORE_INDEX] * (len(bos) + len(prompt)) + body)[:max_length]
        ids.append(seq)
        labels.append(lab)
    return Encoded(ids, labels, False)


def batches(enc: Encoded, order: Sequence[int], *, batch_size: int, pad_id: int,
            device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches in ``order``: input_ids, attention_mask, labels (+ token_type_ids)."""
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(enc.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = enc.input_ids[i]
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if enc.token_type_ids:
            batch["token_type_ids"] = torch.zeros_like(ids)
        if enc.labels and isinstance(enc.labels[0], list):
            lab = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
            for row, i in enumerate(idx):
                seq_labels = enc.labels[i]
                lab[row, :len(seq_labels)] = torch.tensor(seq_labels, dtype=torch.long)
            batch["labels"] = lab
        elif enc.labels:
            batch["labels"] = torch.tensor([enc.labels[i] for i in idx], dtype=torch.long)
        yield {k: v.to(device) for k, v in batch.items()}


# -- memory ------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory while the block runs: CUDA allocated bytes, or process RSS sampled every 10 ms on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda-allocated" if device.type == "cuda" else "cpu-rss"
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def read_provenance(folder: Path) -> dict[str, Any]:
    """The surgeon_provenance.json of an output folder ({} when absent or unreadable)."""
    from surgeon.provenance import PROVENANCE_FILE

    path = folder / PROVENANCE_FILE
    try:
        body = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def accepts_token_types(model: Any) -> bool:
    """Whether the underlying transformers model's forward takes token_type_ids (BERT does, Llama does not)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "token_type_ids" in inspect.signature(inner.forward).parameters
