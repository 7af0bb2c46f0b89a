"""`write_lora_adapter`: per-module ranks/alphas, embeddings and modules_to_save, checked through peft."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from _diff_helpers import load_causal_lm
from surgeon.errors import AdapterError
from surgeon.io.adapter_writer import write_lora_adapter
from surgeon.io.checkpoint import Checkpoint
from surgeon.provenance import provenance

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
DOWN0 = "model.layers.0.mlp.down_proj"
EMBED = "model.embed_tokens"


def _factors(out_dim: int, in_dim: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(r, in_dim), torch.randn(out_dim, r)


def _peft_merge(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_causal_lm(base), adapter).merge_and_unload().state_dict()


def test_per_module_ranks_alphas_embedding_and_saved_modules(tiny_llama, tmp_path):
    torch.manual_seed(0)
    modules = {Q0: _factors(32, 32, 2), V1: _factors(16, 32, 5), DOWN0: _factors(32, 64, 2),
               EMBED: _factors(32, 128, 3)}  # embedding: A (r × num_embeddings), B (dim × r)
    alpha = {Q0: 4.0, V1: 2.5, DOWN0: 4.0, EMBED: 3.0}
    new_norm = torch.full((32,), 0.5)
    with Checkpoint.open(tiny_llama) as base_ckpt:
        written = write_lora_adapter(
            tmp_path / "a", modules, base_model_name_or_path="tiny", alpha=alpha, embedding_modules=[EMBED],
            modules_to_save={"model.norm": {"weight": new_norm},
                             "model.layers.1.input_layernorm": {"weight": (base_ckpt, "model.layers.0.input_layernorm.weight")}},
            record=provenance("test", {}), report={"ok": True},
        )
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (2, 4)
    assert cfg["rank_pattern"] == {V1: 5, EMBED: 3} and cfg["alpha_pattern"] == {V1: 2.5, EMBED: 3.0}
    assert written.parameters == sum(a.numel() + b.numel() for a, b in modules.values()) + 64
    merged = _peft_merge(tiny_llama, tmp_path / "a")
    base = load_file(tiny_llama / "model.safetensors")
    for name, (a, b) in modules.items():
        delta = alpha[name] / a.shape[0] * (b.double() @ a.double())
        if name == EMBED:
            delta = delta.T
        expected = (base[f"{name}.weight"].double() + delta).float()
        assert torch.allclose(merged[f"{name}.weight"], expected, rtol=1e-5, atol=1e-5), name
    assert torch.equal(merged["model.norm.weight"], new_norm)
    assert torch.equal(merged["model.layers.1.input_layernorm.weight"], base["model.layers.0.input_layernorm.weight"])
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])
    assert json.loads((tmp_path / "a" / "surgeon_provenance.json").read_text())["report"] == {"ok": True}


def test_scaling_and_dtype(tiny_llama, tmp_path):
    torch.manual_seed(1)
    modules = {Q0: _factors(32, 32, 4), V1: _factors(16, 32, 2)}
    write_lora_adapter(tmp_path / "a", modules, base_model_name_or_path=None, scaling=0.5, dtype="bf16")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["alpha_pattern"] in ({V1: 1.0}, {Q0: 2.0})  # alpha = scaling·r per module
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    merged = _peft_merge(tiny_llama, tmp_path / "a")
    base = load_file(tiny_llama / "model.safetensors")
    a, b = tensors[f"base_model.model.{Q0}.lora_A.weight"], tensors[f"base_model.model.{Q0}.lora_B.weight"]
    expected = base[f"{Q0}.weight"] + 0.5 * (b.float() @ a.float())
    assert torch.allclose(merged[f"{Q0}.weight"], expected, rtol=1e-5, atol=1e-5)


def test_mismatched_factors_are_refused(tmp_path):
    with pytest.raises(AdapterError) as err:
        write_lora_adapter(tmp_path / "a", {Q0: (torch.zeros(4, 32), torch.zeros(32, 3))}, base_model_name_or_path=None)
    assert str(err.value) == (
        f"LoRA module {Q0!r}: A is [4, 32] and B is [32, 3]; expected A (r × in) and B (out × r) with the same r ≥ 1. "
        "Pass the factors in that order.")
    assert not (tmp_path / "a").exists()


def test_module_cannot_be_target_and_saved(tmp_path):
    with pytest.raises(AdapterError) as err:
        write_lora_adapter(tmp_path / "a", {Q0: (torch.zeros(2, 32), torch.zeros(32, 2))}, base_model_name_or_path=None,
                           modules_to_save={Q0: {"weight": torch.zeros(32, 32)}})
    assert str(err.value) == (f"module {Q0!r} is both a LoRA target and in modules_to_save; peft allows one or the "
                              "other. Drop it from one of the two.")


def test_an_adapter_needs_a_lora_module(tmp_path):
    with pytest.raises(AdapterError) as err:
        write_lora_adapter(tmp_path / "a", {}, base_model_name_or_path=None,
                           modules_to_save={"model.norm": {"weight": torch.ones(32)}})
    assert str(err.value) == (f"{tmp_path / 'a'}: no LoRA module to write; peft cannot load an adapter that targets "
                              "no module (modules_to_save alone is not enough). Pass at least one (A, B) pair.")
