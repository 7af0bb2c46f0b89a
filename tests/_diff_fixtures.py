"""Module-scoped fixtures shared by the diff tests: a real peft LoRA on the tiny Llama and its
merges by peft in float32 and float16. Import them into a test module to use them."""

from __future__ import annotations

import pytest
import torch

from _diff_helpers import make_lora_adapter, merge_with_peft


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory):
    return make_lora_adapter(tiny_llama, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def merged32(tiny_llama, lora, tmp_path_factory):
    return merge_with_peft(tiny_llama, lora, tmp_path_factory.mktemp("m32") / "model")


@pytest.fixture(scope="module")
def merged16(tiny_llama, lora, tmp_path_factory):
    return merge_with_peft(tiny_llama, lora, tmp_path_factory.mktemp("m16") / "model", dtype=torch.float16)
