"""The layouts LLM users trip on, against peft on tiny transformers models (random init,
save_pretrained(safe_serialization=True)): added tokens (embeddings saved whole with more rows) and
tied input/output embeddings changed on one side. Each merged folder must load with transformers and
give the logits of the unmerged PeftModel."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch

from _merge_helpers import load_model, make_adapter, read_folder, save_model
from conftest import tiny_gpt2_config, tiny_llama_config
from surgeon.errors import AdapterError
from surgeon.workflows.merge import merge

TOKENS = torch.tensor([[1, 5, 9, 30, 77, 127]])
ADDED = torch.tensor([[1, 5, 129, 30, 131, 127]])  # 129 and 131: added tokens


def _qwen2_moe_config(**overrides):
    from transformers import Qwen2MoeConfig

    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
              shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(overrides)
    return Qwen2MoeConfig(**kw)


def _base(tmp_path: Path, kind: str, **overrides) -> Path:
    import transformers

    config = {"llama": tiny_llama_config, "gpt2": tiny_gpt2_config, "qwen2_moe": _qwen2_moe_config}[kind](**overrides)
    cls = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
           "qwen2_moe": transformers.Qwen2MoeForCausalLM}[kind]
    torch.manual_seed(0)
    return save_model(cls(config), tmp_path / f"base-{kind}")


def _logits(model: torch.nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _check_loads_like_unmerged(out: Path, unmerged: torch.nn.Module, tokens: torch.Tensor = TOKENS) -> None:
    merged = load_model(out)
    assert torch.allclose(_logits(merged, tokens), _logits(unmerged.eval(), tokens), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,head,targets", [
    ("llama", "lm_head", ["q_proj", "lm_head"]),
    ("llama", "embed", ["q_proj", "embed_tokens"]),
    ("gpt2", "lm_head", ["c_attn", "lm_head"]),
    ("gpt2", "embed", ["c_fc", "wte"]),
    ("qwen2_moe", "lm_head", ["q_proj", "lm_head"]),
])
def test_lora_on_one_side_of_tied_embeddings_unties_them(tmp_path, kind, head, targets):
    base = _base(tmp_path, kind, tie_word_embeddings=True)
    stored = read_folder(base)
    assert "lm_head.weight" not in stored  # tied: only the input embedding is stored
    embedding = next(k for k in stored if k.endswith(("embed_tokens.weight", "wte.weight")))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=kind == "gpt2")
    adapter = make_adapter(base, tmp_path / "adapter", config)
    report = merge(base, [adapter], tmp_path / "out", dtype="fp32")
    assert any("untied lm_head.weight" in note for note in report.notes), report.notes
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    got = read_folder(tmp_path / "out")
    unmerged = peft.PeftModel.from_pretrained(load_model(base), adapter)
    layer = dict(unmerged.named_modules())[f"base_model.model.{'lm_head' if head == 'lm_head' else embedding[:-7]}"]
    delta = layer.get_delta_weight("default")
    changed, kept = ("lm_head.weight", embedding) if head == "lm_head" else (embedding, "lm_head.weight")
    assert torch.equal(got[kept], stored[embedding])  # the other side is the untouched embedding, byte for byte
    assert torch.equal(got[changed], stored[embedding] + delta)
    _check_loads_like_unmerged(tmp_path / "out", unmerged)


def test_untied_base_is_left_as_it_is(tmp_path):
    base = _base(tmp_path, "llama")  # tie_word_embeddings false, lm_head stored
    adapter = make_adapter(base, tmp_path / "adapter", peft.LoraConfig(r=4, target_modules=["lm_head"]))
    report = merge(base, [adapter], tmp_path / "out", dtype="fp32")
    assert not report.notes
    assert sorted(read_folder(tmp_path / "out")) == sorted(read_folder(base))


def _resized_adapter(base: Path, tmp_path: Path, kind: str, added: int, *, tied: bool) -> tuple[Path, torch.nn.Module]:
    """A LoRA adapter trained after resize_token_embeddings(+added), embeddings saved whole (modules_to_save)."""
    model = load_model(base)
    model.resize_token_embeddings(model.config.vocab_size + added)
    saved = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=saved)
    resized_base = save_model(model, tmp_path / "resized-base")  # the base the adapter was trained on
    adapter = make_adapter(resized_base, tmp_path / "adapter", config)
    unmerged = peft.PeftModel.from_pretrained(load_model(resized_base), adapter)
    return adapter, unmerged


@pytest.mark.parametrize("kind", ["llama", "qwen2_moe"])
def test_added_tokens_resize_the_embeddings_and_vocab_size(tmp_path, kind):
    base = _base(tmp_path, kind)
    adapter, unmerged = _resized_adapter(base, tmp_path, kind, 4, tied=False)
    report = merge(base, [adapter], tmp_path / "out")
    assert sum("resized from 128 to 132 rows" in n for n in report.notes) == 2, report.notes
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 132
    got = read_folder(tmp_path / "out")
    assert got["model.embed_tokens.weight"].shape == (132, 32) and got["lm_head.weight"].shape == (132, 32)
    saved = read_folder(adapter)
    assert torch.equal(got["model.embed_tokens.weight"], saved["base_model.model.model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], saved["base_model.model.lm_head.weight"])
    _check_loads_like_unmerged(tmp_path / "out", unmerged, ADDED)


def test_added_tokens_on_a_tied_gpt2(tmp_path):
    """GPT-2 ties wte and lm_head. A resized wte saved whole (modules_to_save) while lm_head stayed tied to
    the resized base's own wte, whose new rows the adapter lacks: refused onto the original base, with the
    fix; merged onto the resized base, untied, as the unmerged model."""
    base = _base(tmp_path, "gpt2")
    model = load_model(base)
    model.resize_token_embeddings(132)
    resized_base = save_model(model, tmp_path / "resized-base")
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["wte"])
    adapter = make_adapter(resized_base, tmp_path / "adapter", config)
    unmerged = peft.PeftModel.from_pretrained(load_model(resized_base), adapter)
    with pytest.raises(AdapterError) as err:
        merge(base, [adapter], tmp_path / "refused")
    assert "transformer.wte.weight" in str(err.value) and "resized base" in str(err.value)
    assert "\n" not in str(err.value)
    report = merge(resized_base, [adapter], tmp_path / "out")
    assert any("untied lm_head.weight" in n for n in report.notes), report.notes
    _check_loads_like_unmerged(tmp_path / "out", unmerged, ADDED)


def test_a_smaller_saved_embedding_is_still_refused(tmp_path):
    base = _base(tmp_path, "llama")
    model = load_model(base)
    model.resize_token_embeddings(120)
    smaller = save_model(model, tmp_path / "smaller")
    adapter = make_adapter(smaller, tmp_path / "adapter", peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                           modules_to_save=["embed_tokens"]))
    with pytest.raises(Exception) as err:
        merge(base, [adapter], tmp_path / "out")
    assert "embed_tokens" in str(err.value) and "\n" not in str(err.value)
