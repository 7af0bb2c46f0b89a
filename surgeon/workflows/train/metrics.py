"""Metrics of a loaded model, shared by `surgeon eval` and `surgeon finetune`.

- classification: accuracy and mean cross-entropy with the trained head;
- causal-lm: mean token loss and perplexity exp(loss) over completion tokens (decoders);
- masked-lm: cross-entropy over a fixed (seeded) 15% of each text's tokens (encoders with an MLM head);
- sentence embeddings: mean-pooled last hidden states (the drift measure's input).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from surgeon.errors import CheckpointFormatError, DataError
from surgeon.io.data import TaskData
from surgeon.progress import progress
from surgeon.workflows.train.textmodel import IGNORE_INDEX, accepts_token_types, batches, encode_causal, encode_texts

MASK_FRACTION = 0.15


@dataclass(frozen=True)
class TaskMetrics:
    """kind: classification | causal-lm | masked-lm. loss: mean cross-entropy (per example or per token)."""

    kind: str
    examples: int
    loss: float
    accuracy: float | None = None
    perplexity: float | None = None
    tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- metrics on a loaded model (shared with finetune) ---------------------------------------------

def _logits(model: Any, tokenizer: Any, enc: Any, count: int, *, batch_size: int,
            device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(labels, float32 logits) of every batch of ``enc``, with the eval progress bar."""
    for batch in progress(batches(enc, range(count), batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                                  device=device), total=math.ceil(count / batch_size), desc="eval", unit="batch"):
        target = batch.pop("labels")
        yield target, model(**batch).logits.float()


@torch.no_grad()
def classification_metrics(model: Any, tokenizer: Any, data: TaskData, labels: list[str], *, batch_size: int,
                           max_length: int, device: torch.device) -> TaskMetrics:
    """Accuracy and mean cross-entropy of the argmax over the head's logits (labels indexed as ``labels``)."""
    enc = encode_texts(tokenizer, data.texts, data.label_ids(labels), max_length, token_types=accepts_token_types(model))
    model.eval()
    loss_sum, correct = 0.0, 0
    for target, logits in _logits(model, tokenizer, enc, len(data), batch_size=batch_size, device=device):
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
    return TaskMetrics("classification", len(data), loss_sum / len(data), accuracy=correct / len(data))


@torch.no_grad()
def causal_metrics(model: Any, tokenizer: Any, data: TaskData, *, batch_size: int, max_length: int,
                   device: torch.device) -> TaskMetrics:
    """Mean next-token cross-entropy over completion (or all text) tokens, and its perplexity."""
    enc = encode_causal(tokenizer, data.examples, max_length)
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in progress(batches(enc, range(len(data)), batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                                  device=device), total=math.ceil(len(data) / batch_size), desc="eval", unit="batch"):
        target = batch.pop("labels")[:, 1:]
        logits = model(**batch).logits[:, :-1].float()
        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                          ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((target != IGNORE_INDEX).sum())
    return _lm_result("causal-lm", len(data), loss_sum, tokens)


def _lm_result(kind: str, examples: int, loss_sum: float, tokens: int) -> TaskMetrics:
    if tokens == 0:
        raise DataError("the evaluation data has no tokens to predict after truncation; raise --max-length.")
    loss = loss_sum / tokens
    return TaskMetrics(kind, examples, loss, perplexity=math.exp(min(loss, 700.0)), tokens=tokens)


def mask_tokens(ids: list[int], special: set[int], mask_id: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Mask round(15%) (at least one) of the non-special positions: (masked ids, labels)."""
    candidates = [i for i, t in enumerate(ids) if t not in special]
    labels = [IGNORE_INDEX] * len(ids)
    if not candidates:
        return list(ids), labels
    count = max(1, round(MASK_FRACTION * len(candidates)))
    chosen = torch.randperm(len(candidates), generator=generator)[:count].tolist()
    masked = list(ids)
    for c in chosen:
        pos = candidates[c]
        labels[pos], masked[pos] = ids[pos], mask_id
    return masked, labels


@torch.no_grad()
def masked_lm_metrics(model: Any, tokenizer: Any, data: TaskData, *, batch_size: int, max_length: int,
                      device: torch.device, seed: int = 0) -> TaskMetrics:
    """Masked-LM cross-entropy over a fixed (seeded) 15% of each text's tokens."""
    if tokenizer.mask_token_id is None:
        raise CheckpointFormatError("the tokenizer has no mask token, so masked-LM loss cannot be measured; measure "
                                    "forgetting with --drift-from BASE instead.")
    enc = encode_texts(tokenizer, data.texts, [], max_length, token_types=accepts_token_types(model))
    special = set(tokenizer.all_special_ids)
    generator = torch.Generator().manual_seed(seed)
    pairs = [mask_tokens(ids, special, tokenizer.mask_token_id, generator) for ids in enc.input_ids]
    enc = type(enc)([p[0] for p in pairs], [p[1] for p in pairs], enc.token_type_ids)
    model.eval()
    loss_sum, tokens = 0.0, 0
    for target, logits in _logits(model, tokenizer, enc, len(data), batch_size=batch_size, device=device):
        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                          ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((target != IGNORE_INDEX).sum())
    return _lm_result("masked-lm", len(data), loss_sum, tokens)


@torch.no_grad()
def sentence_embeddings(model: Any, tokenizer: Any, texts: list[str], *, batch_size: int, max_length: int,
                        device: torch.device) -> torch.Tensor:
    """Mean-pooled last hidden states, float32 (n_texts × hidden), as sentence-transformers pools MiniLM."""
    backbone = model.base_model
    enc = encode_texts(tokenizer, texts, [], max_length, token_types=accepts_token_types(backbone))
    backbone.eval()
    out = []
    for batch in progress(batches(enc, range(len(texts)), batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                                  device=device), total=math.ceil(len(texts) / batch_size), desc="embed", unit="batch"):
        hidden = backbone(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).cpu())
    return torch.cat(out)
