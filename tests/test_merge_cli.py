"""`surgeon merge` on the command line: output, JSON, and every refusal with its exact message."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from _merge_helpers import make_adapter, peft_merged, read_folder, save_model
from conftest import tiny_llama_config
from surgeon.cli.main import cli

Q = "base_model.model.model.layers.0.self_attn.q_proj"
D = "base_model.model.model.layers.0.mlp.down_proj"  # sorts first in the adapter file: the first offending tensor


def run(*args: object) -> object:
    return CliRunner().invoke(cli, ["merge", *map(str, args)])


def hand_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    """An adapter folder written by hand: exactly these tensors and this config (peft defaults for LoRA)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    body = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "init_lora_weights": True,
            "base_model_name_or_path": "tiny-llama", **config}
    (folder / "adapter_config.json").write_text(json.dumps(body))
    return folder


def lora_pair(prefix: str, out: int, inn: int, r: int = 2) -> dict[str, torch.Tensor]:
    return {f"{prefix}.lora_A.weight": torch.randn(r, inn), f"{prefix}.lora_B.weight": torch.randn(out, r)}


@pytest.fixture()
def lora(tiny_llama, tmp_path) -> Path:
    return make_adapter(tiny_llama, tmp_path / "lora", peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))


def test_help_ends_with_an_example():
    result = CliRunner().invoke(cli, ["merge", "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "surgeon merge ./Llama-3.2-1B ./my-lora -o ./merged" in result.output


def test_json_report(tiny_llama, lora, tmp_path):
    out = tmp_path / "out"
    result = run(tiny_llama, f"{lora}:0.5", "-o", out, "--json", "--precision-report", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["command"] == "merge" and body["merged"] == 4 and body["copied"] == body["tensors"] - 4
    assert body["adapters"] == [{"path": str(lora), "peft_type": "LORA", "weight": 0.5}]
    assert {e["operations"] for e in body["entries"]} == {"lora(a0)"}
    assert json.loads((tmp_path / "p.json").read_text())["tensors"][0]["lost_fraction"] == 0.0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "surgeon_provenance.json", "tokenizer_config.json"])
    _assert_equals_peft(read_folder(out), peft_merged(tiny_llama, [(lora, 0.5)]), tiny_llama, changed=4)


def _assert_equals_peft(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], base: Path,
                        *, changed: int) -> None:
    """Every written tensor equals peft's merge_and_unload bit for bit; exactly ``changed`` differ from the base."""
    original = read_folder(base)
    assert ours.keys() == reference.keys() == original.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name
    assert sum(not torch.equal(ours[n], original[n]) for n in ours) == changed


def test_human_output_lists_changed_tensors(tiny_llama_bf16, tmp_path):
    lora = make_adapter(tiny_llama_bf16, tmp_path / "a", peft.LoraConfig(r=2, target_modules=["q_proj"]), scale=1e-5)
    result = run(tiny_llama_bf16, lora, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "2 tensors changed; largest share of ΔW lost to rounding first:" in result.stdout
    assert "model.layers.0.self_attn.q_proj.weight" in result.stdout
    assert "wrote " in result.stderr and "2 merged, 0 replaced, 0 cast only" in result.stderr
    assert "Warning: model.layers.0.self_attn.q_proj.weight:" in result.stderr
    assert "merge with --dtype fp32 to keep it." in result.stderr


def test_single_file_output(tiny_llama, lora, tmp_path):
    result = run(tiny_llama, lora, "-o", tmp_path / "merged.safetensors")
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["merged.safetensors"]
    _assert_equals_peft(read_folder(tmp_path), peft_merged(tiny_llama, [(lora, 1.0)]), tiny_llama, changed=4)


def expect_error(result: object, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stderr == f"Error: {message}\n"


def test_unknown_peft_type(tiny_llama, tmp_path):
    ad = hand_adapter(tmp_path / "pt", {"prompt_embeddings": torch.zeros(4, 32)}, peft_type="PROMPT_TUNING")
    expect_error(run(tiny_llama, ad, "-o", tmp_path / "out"),
                 f"{ad}/adapter_config.json: peft_type 'PROMPT_TUNING' is a prompt-learning method: it adds virtual "
                 "tokens and leaves the model's weights as they are, so there is nothing to merge. Use the adapter "
                 "unmerged with peft.")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_adapter_trained_against_a_modified_base(init, tiny_llama, tmp_path):
    ad = hand_adapter(tmp_path / init, lora_pair(Q, 32, 32), init_lora_weights=init)
    expect_error(run(tiny_llama, ad, "-o", tmp_path / "out"),
                 f"{ad}/adapter_config.json: init_lora_weights='{init}': this adapter was trained against a modified "
                 "base (PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA move part of W into the adapter at initialization), so adding "
                 "it to the original base gives wrong weights. Re-save it converted with peft's save_pretrained(..., "
                 "path_initial_model_for_weight_conversion=...) (the saved config then says init_lora_weights=true), "
                 "or merge it onto the modified base it was trained with.")
    assert not (tmp_path / "out").exists()


def test_unsupported_lora_variant(tiny_llama, tmp_path):
    ad = hand_adapter(tmp_path / "alora", lora_pair(Q, 32, 32), alora_invocation_tokens=[5, 6])
    expect_error(run(tiny_llama, ad, "-o", tmp_path / "out"),
                 f"{ad}: peft cannot merge this LORA adapter into module 'model.layers.0.self_attn.q_proj' (aLoRA "
                 "does not support merging); use the adapter unmerged with peft.")


@pytest.fixture(scope="module")
def wider_llama(tmp_path_factory) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return save_model(LlamaForCausalLM(tiny_llama_config(hidden_size=48, num_attention_heads=4)),
                      tmp_path_factory.mktemp("wider_llama"))


def test_shape_mismatch_names_the_first_offending_tensor_and_both_shapes(tiny_llama, wider_llama, lora, tmp_path):
    expect_error(run(wider_llama, lora, "-o", tmp_path / "out"),
                 f"{lora}: adapter tensor '{D}.lora_A.weight' gives a change of shape [32, 64] for base tensor "
                 "'model.layers.0.mlp.down_proj.weight', which is [48, 64]; the adapter was trained on a different "
                 f"model (its config names '{tiny_llama}'). Merge it onto the model it was trained on.")


def test_adapter_for_another_architecture(tiny_gpt2, tiny_llama, lora, tmp_path):
    expect_error(run(tiny_gpt2, lora, "-o", tmp_path / "out"),
                 f"{lora}: adapter tensor '{D}.lora_A.weight' targets 'model.layers.0.mlp.down_proj.weight', which "
                 f"the base {tiny_gpt2} does not have; the adapter was trained on a different model (its config names "
                 f"'{tiny_llama}'). Merge it onto the model it was trained on.")


def test_ambiguous_module_name(tiny_llama, tmp_path):
    ad = hand_adapter(tmp_path / "amb", lora_pair("base_model.model.self_attn.q_proj", 32, 32))
    expect_error(run(tiny_llama, ad, "-o", tmp_path / "out"),
                 f"{ad}: adapter tensor for 'self_attn.q_proj.weight' matches several base tensors "
                 "(model.layers.0.self_attn.q_proj.weight, model.layers.1.self_attn.q_proj.weight); the adapter and "
                 "base use different module prefixes. Give the base model the adapter was trained on (same "
                 "architecture class) so the names line up.")


def test_convolution_adapter_on_a_linear_layer_is_refused(tiny_llama, tmp_path):
    """Convolutions merge (tests/test_peft_matrix.py); a conv LoRA saved for a Linear does not fit it."""
    conv = {f"{Q}.lora_A.weight": torch.zeros(2, 32, 3, 3), f"{Q}.lora_B.weight": torch.zeros(32, 2, 1, 1)}
    ad = hand_adapter(tmp_path / "conv", conv)
    expect_error(run(tiny_llama, ad, "-o", tmp_path / "out"),
                 f"{ad}: peft builds no LORA layer on base module 'model.layers.0.self_attn.q_proj' (weight [32, 32]) "
                 f"with the saved adapter shapes ({Q[len('base_model.model.'):]}.lora_A.weight [2, 32, 3, 3], "
                 f"{Q[len('base_model.model.'):]}.lora_B.weight [32, 2, 1, 1]); the adapter was trained on a different "
                 "model. Merge it onto that model.")


def test_rank_in_config_does_not_match_weights(tiny_llama, tmp_path):
    ad = hand_adapter(tmp_path / "rank", lora_pair(Q, 32, 32, r=2), r=8)
    expect_error(run(tiny_llama, ad, "-o", tmp_path / "out"),
                 f"{ad}: adapter_config.json gives module 'model.layers.0.self_attn.q_proj' rank 8 (r/rank_pattern) "
                 f"but '{Q}.lora_A.weight' has 2 rows; the config does not belong to these weights. Re-save the adapter.")


def test_lora_bias_needs_a_base_bias(tiny_llama, tmp_path):
    ad = hand_adapter(tmp_path / "bias", {**lora_pair(Q, 32, 32), f"{Q}.lora_B.bias": torch.zeros(32)}, lora_bias=True)
    expect_error(run(tiny_llama, ad, "-o", tmp_path / "out"),
                 f"{ad}: module 'model.layers.0.self_attn.q_proj' has a trained lora_B bias (lora_bias=true) but the "
                 "base has no model.layers.0.self_attn.q_proj.bias to add it to; peft cannot merge this either. Use the "
                 "adapter unmerged.")


def test_four_bit_base_is_refused(tmp_path, lora):
    base = tmp_path / "qbase"
    base.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(512, 1, dtype=torch.uint8),
               "model.layers.0.self_attn.q_proj.weight.absmax": torch.ones(16)}, base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    expect_error(run(base, lora, "-o", tmp_path / "out"),
                 f"{base}: the base is stored quantized to 4 bits (bitsandbytes); a float ΔW cannot be added to 4-bit "
                 "codes without re-quantizing away most of it. Merge into the unquantized model the 4-bit one was made "
                 "from (bf16/fp16/fp32), e.g. the base_model_name_or_path of a QLoRA adapter.")


def test_non_finite_merge_is_an_error(tiny_llama, tmp_path):
    nan = {**lora_pair(Q, 32, 32), f"{Q}.lora_B.weight": torch.full((32, 2), float("nan"))}
    ad = hand_adapter(tmp_path / "nan", nan)
    result = run(tiny_llama, ad, "-o", tmp_path / "out")  # the NaN factor itself is named, before any work
    expect_error(result, f"{ad / 'adapter_model.safetensors'}: tensor '{Q}.lora_B.weight' holds 64 NaN/Inf value(s) "
                         "of 64; the adapter is corrupt or its training diverged; re-download or re-train it "
                         "(`surgeon inspect` lists its tensors).")
    assert not (tmp_path / "out").exists()
    big = hand_adapter(tmp_path / "big", {f"{Q}.lora_A.weight": torch.full((2, 32), 1e20),
                                              f"{Q}.lora_B.weight": torch.full((32, 2), 1e20)})
    expect_error(run(tiny_llama, big, "-o", tmp_path / "out"),  # finite factors whose product overflows float32
                 "model.layers.0.self_attn.q_proj.weight: the merge (lora(a0)) produced 1,024 non-finite values "
                 "in F32; the adapter is broken or its scale overflows the dtype. Check it with `surgeon "
                 "inspect`, lower its weight, or merge with --dtype fp32.")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arg,message", [
    (":nan", "{ad}:nan: adapter weight 'nan' is not a finite number; write e.g. {ad}:0.5."),
    (":inf", "{ad}:inf: adapter weight 'inf' is not a finite number; write e.g. {ad}:0.5."),
])
def test_bad_adapter_weight(arg, message, tiny_llama, lora, tmp_path):
    expect_error(run(tiny_llama, f"{lora}{arg}", "-o", tmp_path / "out"), message.format(ad=lora))


def test_bad_options(tiny_llama, lora, tmp_path):
    expect_error(run(tiny_llama, lora, "-o", tmp_path / "out", "--dtype", "int8"),
                 "--dtype 'int8' is not a float dtype surgeon writes; use auto, fp32, fp16 or bf16.")
    expect_error(run(tiny_llama, lora, "-o", tmp_path / "out", "--device", "tpu"),
                 "--device 'tpu' is not a device surgeon computes on; use auto, cpu, cuda or cuda:N.")
    if not torch.cuda.is_available():
        expect_error(run(tiny_llama, lora, "-o", tmp_path / "out", "--device", "cuda"),
                     "--device cuda: no CUDA device is available to torch here; use --device cpu (or auto).")
    missing = tmp_path / "nope"
    expect_error(run(tiny_llama, missing, "-o", tmp_path / "out"), f"{missing}: no such file or folder; check the path.")
