"""Adapter weights (ADAPTER:W) and mixed adapter types in one pass.

peft defines a weight only where a layer has ``set_scale`` (LoRA, DoRA, LoHa, LoKr):
those are checked against peft bit for bit. For the other types the weight scales ΔW
(IA3: l -> 1 + w(l - 1); modules_to_save: W -> W + w(R - W)); weight 0 must give back the
base exactly, and mixed types apply in the order given.
"""

from __future__ import annotations

import peft
import pytest
import torch

from safetensors.torch import load_file

from _merge_helpers import make_adapter, peft_merged, read_folder
from surgeon.io.checkpoint import Checkpoint
from surgeon.workflows.merge.run import merge

WEIGHTED_WITH_PEFT = {
    "loha": peft.LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "down_proj"]),
    "lokr": peft.LoKrConfig(r=4, alpha=6, target_modules=["q_proj"]),
    "dora": peft.LoraConfig(r=4, use_dora=True, target_modules=["v_proj"]),
}


@pytest.mark.parametrize("case", sorted(WEIGHTED_WITH_PEFT))
def test_weighted_adapter_equals_peft_set_scale(case, tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "a", WEIGHTED_WITH_PEFT[case])
    merge(tiny_llama, [f"{adapter}:0.35"], tmp_path / "out")
    reference = peft_merged(tiny_llama, [(adapter, 0.35)])
    for name, tensor in read_folder(tmp_path / "out").items():
        assert torch.equal(tensor, reference[name]), name


ZERO_WEIGHT = {
    "lora_modules_to_save": peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "adalora": peft.AdaLoraConfig(init_r=4, total_step=10, target_modules=["v_proj"]),
    "vera": peft.VeraConfig(r=4, target_modules=["q_proj", "up_proj"]),
    "ia3": peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "hira": peft.HiraConfig(r=4, target_modules=["q_proj"]),
}


@pytest.mark.parametrize("case", sorted(ZERO_WEIGHT))
def test_weight_zero_gives_back_the_base(case, tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "a", ZERO_WEIGHT[case])
    report = merge(tiny_llama, [(adapter, 0.0)], tmp_path / "out")
    assert report.merged + report.replaced > 0 and all(e.changed == 0 for e in report.entries)
    with Checkpoint.open(tiny_llama) as base:
        for name, tensor in read_folder(tmp_path / "out").items():
            assert torch.equal(tensor, base.get(name)), name


def _adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _vera_delta(tensors: dict[str, torch.Tensor], key: str, shape: torch.Size) -> torch.Tensor:
    """peft's VeRA ΔW by hand: (λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in]) from the shared A, B in the adapter file."""
    out_f, in_f = shape
    shared_a, shared_b = tensors["base_model.vera_A"][:, :in_f], tensors["base_model.vera_B"][:out_f]
    lambda_b, lambda_d = tensors[f"{key}.vera_lambda_b"], tensors[f"{key}.vera_lambda_d"]
    return (lambda_b[:, None] * shared_b) @ (lambda_d[:, None] * shared_a)


def test_weighted_ia3_and_vera_scale_the_change(tiny_llama, tmp_path):
    """No set_scale in peft for these: IA3 at 0.5 is W ⊙ (1 + 0.5(l - 1)), VeRA at 1/3 is W + ΔW/3, by hand."""
    ia3 = make_adapter(tiny_llama, tmp_path / "ia3", ZERO_WEIGHT["ia3"])
    vera = make_adapter(tiny_llama, tmp_path / "vera", ZERO_WEIGHT["vera"])
    base = read_folder(tiny_llama)
    merge(tiny_llama, [(ia3, 0.5)], tmp_path / "ia3_half")
    merge(tiny_llama, [(vera, 1 / 3)], tmp_path / "vera_third")
    half, third = read_folder(tmp_path / "ia3_half"), read_folder(tmp_path / "vera_third")

    name = "model.layers.0.self_attn.k_proj.weight"
    l_vec = _adapter_tensors(ia3)["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"]
    assert torch.equal(half[name], base[name] * (1 + 0.5 * (l_vec - 1)))

    tensors, full = _adapter_tensors(vera), peft_merged(tiny_llama, [(vera, 1.0)])
    for module in ("self_attn.q_proj", "mlp.up_proj"):
        for layer in (0, 1):
            name = f"model.layers.{layer}.{module}.weight"
            delta = _vera_delta(tensors, f"base_model.model.model.layers.{layer}.{module}", base[name].shape)
            assert torch.allclose(full[name], base[name] + delta, rtol=0, atol=1e-6), name  # the hand formula is peft's
            assert not torch.equal(third[name], base[name]), name
            assert torch.allclose(third[name], base[name] + delta / 3, rtol=1e-5, atol=1e-7), name


def test_mixed_types_apply_in_order(tiny_llama, tmp_path):
    """LoRA then IA3 on the same tensor: W' = (W + s·B·A) ⊙ l, in float32, rounded once."""
    lora = make_adapter(tiny_llama, tmp_path / "lora", peft.LoraConfig(r=4, target_modules=["k_proj"]), seed=1)
    ia3 = make_adapter(tiny_llama, tmp_path / "ia3", ZERO_WEIGHT["ia3"], seed=2)
    report = merge(tiny_llama, [lora, ia3], tmp_path / "out")
    name = "model.layers.1.self_attn.k_proj.weight"
    assert {e.name: e.operations for e in report.entries}[name] == "lora(a0)+ia3(a1)"
    key = "base_model.model.model.layers.1.self_attn.k_proj"
    la, ia = _adapter_tensors(lora), _adapter_tensors(ia3)
    delta = (la[f"{key}.lora_B.weight"] @ la[f"{key}.lora_A.weight"]) * (8 / 4)  # s = lora_alpha / r
    expected = (read_folder(tiny_llama)[name] + delta) * ia[f"{key}.ia3_l"]
    assert torch.equal(read_folder(tmp_path / "out")[name], expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merge_matches_cpu(tiny_llama_bf16, tmp_path):
    adapter = make_adapter(tiny_llama_bf16, tmp_path / "a", peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    merge(tiny_llama_bf16, [adapter], tmp_path / "cpu", device="cpu")
    merge(tiny_llama_bf16, [adapter], tmp_path / "cuda", device="cuda")
    cpu, cuda = read_folder(tmp_path / "cpu"), read_folder(tmp_path / "cuda")
    for name in cpu:
        assert (cpu[name].float() - cuda[name].float()).abs().max() <= 2 ** -7 * cpu[name].float().abs().max(), name
