"""`merge --base-quant nf4|fp4`: the base rounded through bitsandbytes' 4-bit quantize-dequantize, then
peft's ΔW added. References: bitsandbytes itself (when it is installed and loads), and an NF4 round trip
written here by hand from the QLoRA paper's table and bitsandbytes' documented block algorithm."""

from __future__ import annotations

import json
import math
import shutil

import peft
import pytest
import torch
from click.testing import CliRunner

from _merge_helpers import load_model, make_adapter, read_folder
from surgeon.cli.main import cli
from surgeon.ops.quant import roundtrip_4bit
from surgeon.workflows.merge import merge


def _bnb_round_trip(functional, weight: torch.Tensor, quant_type: str, double_quant: bool) -> torch.Tensor:
    """bitsandbytes' quantize_4bit + dequantize_4bit. On the flattened tensor: its blocks run over the flattened
    weight (CUDA kernels and its reference code), but its CPU dequantization kernel (0.50) mis-blocks a 2-D
    tensor whose rows are not a multiple of the block size (e.g. 64 x 32)."""
    packed, state = functional.quantize_4bit(weight.reshape(1, -1), blocksize=64, quant_type=quant_type,
                                             compress_statistics=double_quant)
    return functional.dequantize_4bit(packed, state).view(weight.shape)


def _bitsandbytes():
    try:
        import bitsandbytes.functional as functional

        functional.quantize_4bit(torch.ones(64), blocksize=64, quant_type="nf4")
    except Exception as exc:  # not installed, or no backend for this machine
        pytest.skip(f"bitsandbytes cannot run here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                    "the hand-written NF4 reference below still checks the round trip")
    return functional


# The QLoRA paper's NF4 values (Dettmers et al. 2023, appendix E), typed in by hand.
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def _hand_nf4(values: list[float], blocksize: int) -> list[float]:
    """The documented algorithm, element by element in float32: per block absmax, x·(1/absmax) (a short last
    block: x/absmax), nearest NF4 value (the smaller at a tie), times absmax."""
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    out = []
    for start in range(0, len(values), blocksize):
        block = values[start : start + blocksize]
        absmax = max(abs(v) for v in block)
        full = len(block) == blocksize
        for v in block:
            scaled = f32(v * f32(1.0 / absmax)) if full else f32(v / absmax)
            best = min(range(16), key=lambda i: (abs(scaled - NF4[i]), i))
            out.append(f32(f32(NF4[best]) * absmax))
    return out


def test_nf4_round_trip_equals_the_hand_written_algorithm():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(150, generator=gen) * 0.02  # two full blocks of 64 and a short one of 22
    weight[5], weight[70] = 0.0, -0.05
    expected = torch.tensor(_hand_nf4(weight.tolist(), 64), dtype=torch.float32)
    assert torch.equal(roundtrip_4bit(weight, "nf4", blocksize=64), expected)
    assert torch.equal(roundtrip_4bit(weight, "nf4", blocksize=16), torch.tensor(_hand_nf4(weight.tolist(), 16)))


def test_hand_set_block_lands_on_the_table():
    """A block holding exactly the table times 3: every value comes back exactly."""
    weight = torch.tensor(NF4 * 4) * 3.0
    assert torch.equal(roundtrip_4bit(weight, "nf4"), weight)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_equals_bitsandbytes(quant_type, double_quant, dtype):
    functional = _bitsandbytes()
    gen = torch.Generator().manual_seed(7)
    for shape in [(64, 128), (64, 32), (33, 77), (5, 3), (512, 300)]:  # (512, 300): 2400 blocks, absmax in 10 blocks of 256
        weight = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
        expected = _bnb_round_trip(functional, weight, quant_type, double_quant)
        got = roundtrip_4bit(weight, quant_type, blocksize=64, double_quant=double_quant)
        assert got.dtype == dtype and got.shape == weight.shape
        assert torch.equal(got, expected), (shape, (got.float() - expected.float()).abs().max())  # ±0 may differ


@pytest.fixture(scope="module")
def qlora(tiny_llama, tmp_path_factory):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("qlora"), config)


def _expected(tiny_llama, qlora, reference) -> dict[str, torch.Tensor]:
    """peft's ΔW on each LoRA layer added to the reference round trip of every quantized weight."""
    model = peft.PeftModel.from_pretrained(load_model(tiny_llama), qlora).eval()
    deltas = {f"{name[len('base_model.model.'):]}.weight": module.get_delta_weight("default")
              for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.Linear)}
    out = {}
    for name, weight in load_model(tiny_llama).state_dict().items():
        quantized = weight.dim() == 2 and "embed" not in name and "lm_head" not in name
        base = reference(weight) if quantized else weight
        out[name] = base + deltas[name] if name in deltas else base
    return out


def test_merge_onto_the_nf4_base_equals_dequantized_base_plus_peft_delta(tiny_llama, qlora, tmp_path):
    reference = lambda w: torch.tensor(_hand_nf4(w.reshape(-1).tolist(), 64)).view(w.shape)  # noqa: E731
    expected = _expected(tiny_llama, qlora, reference)
    report = merge(tiny_llama, [qlora], tmp_path / "out", dtype="fp32", base_quant="nf4",
                   precision_report=tmp_path / "precision.json")
    got = read_folder(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name
    assert any("nf4" in n and "--base-quant" in n for n in report.notes)
    rows = {r["name"]: r for r in json.loads((tmp_path / "precision.json").read_text())["tensors"]}
    q = "model.layers.0.self_attn.q_proj.weight"
    base = load_model(tiny_llama).state_dict()[q]
    assert rows[q]["base_quant_error"] == pytest.approx(float((reference(base) - base).norm()), rel=1e-5)
    assert "model.layers.0.self_attn.k_proj.weight" in rows  # no adapter there, still rounded
    assert "model.embed_tokens.weight" not in rows and "lm_head.weight" not in rows


def test_fp4_double_quant_merge_equals_bitsandbytes_plus_peft_delta(tiny_llama, qlora, tmp_path):
    functional = _bitsandbytes()

    def reference(weight):
        return _bnb_round_trip(functional, weight, "fp4", True)

    expected = _expected(tiny_llama, qlora, reference)
    adapter = tmp_path / "recorded"
    shutil.copytree(qlora, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    report = merge(tiny_llama, [adapter], tmp_path / "out", dtype="fp32")  # the recorded config decides
    assert any("from quantization_config" in n and "double quantization" in n for n in report.notes)
    got = read_folder(tmp_path / "out")
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name


def test_recorded_config_is_the_default_and_none_turns_it_off(tiny_llama, qlora, tmp_path):
    adapter = tmp_path / "recorded"
    shutil.copytree(qlora, adapter)
    (adapter / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    merge(tiny_llama, [adapter], tmp_path / "auto", dtype="fp32")
    merge(tiny_llama, [qlora], tmp_path / "explicit", dtype="fp32", base_quant="nf4")
    off = merge(tiny_llama, [adapter], tmp_path / "off", dtype="fp32", base_quant="none")
    merge(tiny_llama, [qlora], tmp_path / "plain", dtype="fp32")
    auto, explicit = read_folder(tmp_path / "auto"), read_folder(tmp_path / "explicit")
    plain, unquantized = read_folder(tmp_path / "off"), read_folder(tmp_path / "plain")
    assert all(torch.equal(auto[k], explicit[k]) for k in auto)
    assert all(torch.equal(plain[k], unquantized[k]) for k in plain)
    assert not [n for n in off.notes if "quant" in n]  # (a note on measured shapes may be there)
    result = CliRunner().invoke(cli, ["merge", str(tiny_llama), str(adapter), "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "Note: base weights rounded through bitsandbytes' 4-bit nf4" in result.output
    assert math.isfinite(float(read_folder(tmp_path / "cli")["model.layers.0.mlp.up_proj.weight"].sum()))


def test_gpt2_conv1d_weights_are_rounded_as_the_linear_layers_transformers_quantizes(tiny_gpt2, tmp_path):
    """transformers quantizes a Conv1D weight (stored in x out) transposed, as a Linear: blocks of 64 run
    along its input dimension. The merge rounds W.T and stores the result back in the Conv1D layout."""
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    adapter = make_adapter(tiny_gpt2, tmp_path / "adapter", config)
    model = peft.PeftModel.from_pretrained(load_model(tiny_gpt2), adapter).eval()
    deltas = {f"{name[len('base_model.model.'):]}.weight": module.get_delta_weight("default")
              for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.Linear)}
    merge(tiny_gpt2, [adapter], tmp_path / "out", dtype="fp32", base_quant="nf4")
    got = read_folder(tmp_path / "out")
    for name, weight in load_model(tiny_gpt2).state_dict().items():
        if name not in got:  # lm_head: tied to wte, not stored
            continue
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            as_linear = weight.T.contiguous()
            base = torch.tensor(_hand_nf4(as_linear.reshape(-1).tolist(), 64)).view(as_linear.shape).T
        else:
            base = weight  # embeddings, norms, biases, the tied head: kept
        expected = base + deltas[name] if name in deltas else base
        assert torch.equal(got[name], expected), name


def test_merged_weights_are_what_transformers_4bit_loading_dequantizes(tmp_path):
    """The whole loop through transformers: a Llama loaded with BitsAndBytesConfig(load_in_4bit, nf4) and a
    LoRA on it. Every Linear4bit's dequantized weight equals the merged tensor minus nothing (k_proj, o_proj,
    mlp: no adapter) or minus peft's ΔW (q_proj, v_proj) exactly, and the merged model's logits are far
    closer to the unmerged QLoRA model's than a merge onto the unquantized base (bitsandbytes' CPU 4-bit
    matmul rounds on its own, so not equal)."""
    functional = _bitsandbytes()
    import transformers

    from conftest import tiny_llama_config
    from _merge_helpers import save_model

    torch.manual_seed(0)  # 128 wide: bitsandbytes' CPU 4-bit layers need rows and columns in blocks of 64
    base = save_model(transformers.LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=256)),
                      tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32)
    four_bit = transformers.LlamaForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32)
    dequantized = {f"{n}.weight": functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
                   for n, m in four_bit.named_modules() if type(m).__name__ == "Linear4bit"}
    unmerged = peft.PeftModel.from_pretrained(four_bit, adapter).eval()
    deltas = {f"{n[len('base_model.model.'):]}.weight": m.get_delta_weight("default")  # peft's lora.bnb.Linear4bit
              for n, m in unmerged.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    merge(base, [adapter], tmp_path / "qlora", dtype="fp32", base_quant="nf4")
    merge(base, [adapter], tmp_path / "plain", dtype="fp32", base_quant="none")
    got = read_folder(tmp_path / "qlora")
    assert len(dequantized) == 14
    for name, weight in dequantized.items():
        assert torch.equal(got[name], weight + deltas[name] if name in deltas else weight), name
    tokens = torch.tensor([[1, 5, 9, 30, 77, 127]])
    with torch.no_grad():
        reference = unmerged(input_ids=tokens).logits
        near = (load_model(tmp_path / "qlora")(input_ids=tokens).logits - reference).abs().max()
        far = (load_model(tmp_path / "plain")(input_ids=tokens).logits - reference).abs().max()
    assert near < far / 10, (near, far)
