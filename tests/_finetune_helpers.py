"""Tiny models with offline tokenizers, and toy data, for the finetune/eval tests.

The conftest fixtures have no usable tokenizer, so these build their own: a
WordPiece vocabulary of letters plus the toy words, saved with the model.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import torch

POSITIVE = ["good", "great", "nice", "love", "fine"]
NEGATIVE = ["bad", "awful", "poor", "hate", "sad"]
FILLER = ["the", "a", "movie", "food", "day", "was", "is", "very", "it", "this", "and", "so"]
TOPIC_WORDS = {"sport": ["ball", "goal", "team"], "food": ["soup", "bread", "salt"], "tech": ["code", "chip", "disk"]}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def vocabulary() -> list[str]:
    words = POSITIVE + NEGATIVE + FILLER + [w for ws in TOPIC_WORDS.values() for w in ws]
    letters = list(string.ascii_lowercase)
    vocab = SPECIALS + letters + ["##" + c for c in letters] + list(".,!?'") + words
    assert len(vocab) <= 128
    return vocab


def save_tokenizer(folder: Path) -> None:
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP]) written with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tk.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                        sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    tokenizer.save_pretrained(str(folder))


def bert_config(**overrides):
    from transformers import BertConfig

    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kw.update(overrides)
    return BertConfig(**kw)


def build_model(kind: str, folder: Path) -> Path:
    """kind: bert (BertModel, like MiniLM), bert-cls, bert-mlm, llama, gpt2. float32, seeded, with tokenizer."""
    from transformers import (BertForMaskedLM, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(bert_config())
    elif kind == "bert-cls":  # a task base laid out as a classifier (head included), like the demo's
        model = BertForSequenceClassification(bert_config(num_labels=2, id2label={0: "negative", 1: "positive"},
                                                          label2id={"negative": 0, "positive": 1}))
    elif kind == "bert-mlm":
        model = BertForMaskedLM(bert_config())
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                             tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=2, eos_token_id=3, pad_token_id=0))
    else:
        raise ValueError(kind)
    model.save_pretrained(str(folder), safe_serialization=True)
    save_tokenizer(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Learnable toy sentiment: one cue word among fillers decides the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        cue = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        words = rng.sample(FILLER, 3) + [cue]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def topic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = sorted(TOPIC_WORDS)
    rows = []
    for i in range(n):
        label = names[i % len(names)]
        words = rng.sample(FILLER, 2) + [rng.choice(TOPIC_WORDS[label])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def lm_rows(n: int, seed: int) -> list[dict]:
    """A repeating pattern a causal LM learns in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(6)
        rows.append({"text": " ".join(["the", "cat", "and", "the", "dog", "so", "good"][start:] * 2)})
    return rows
