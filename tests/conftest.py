"""Session fixtures: tiny random-init checkpoints built from transformers configs.

Each fixture returns a folder written by ``save_pretrained`` (safetensors,
float32) with config.json and a couple of tokenizer-like side files, so tests
never download anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgeon.progress import set_progress

TOKENIZER_FILES = {
    "tokenizer_config.json": json.dumps({"model_max_length": 128, "chat_template": "{{ messages }}"}),
    "special_tokens_map.json": json.dumps({"unk_token": "[UNK]"}),
    "generation_config.json": json.dumps({"max_new_tokens": 8}),
}


@pytest.fixture(autouse=True, scope="session")
def _no_progress_bars():
    set_progress(False)


def _save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    for name, text in TOKENIZER_FILES.items():
        if not (folder / name).exists():
            (folder / name).write_text(text)
    return folder


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    kw = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    kw.update(overrides)
    return GPT2Config(**kw)


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, num_labels=2)
    kw.update(overrides)
    return BertConfig(**kw)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return _save(LlamaForCausalLM(tiny_llama_config()), tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return _save(GPT2LMHeadModel(tiny_gpt2_config()), tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return _save(BertForSequenceClassification(tiny_bert_config()), tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama_bf16(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    return _save(model, tmp_path_factory.mktemp("tiny_llama_bf16"))
