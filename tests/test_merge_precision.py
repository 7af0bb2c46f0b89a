"""Precision of `surgeon merge`: one rounding, the precision report, byte-identical copies, loading.

Low-precision bases: the output must equal round(W.float() + ΔW_fp32), with the float32 merge
taken from peft on the exactly upcast base, and must never be further from it than peft's own
bf16/fp16 merge. The merged folder must load in transformers and reproduce the PeftModel's logits.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch

from _merge_helpers import cast_base, load_model, make_adapter, peft_merged, peft_model, read_folder
from surgeon.errors import NumericalError
from surgeon.io.checkpoint import Checkpoint
from surgeon.workflows.merge.run import merge

LORA = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
DORA = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"])


@pytest.fixture(scope="module")
def llama_fp16(tiny_llama, tmp_path_factory):
    return cast_base(tiny_llama, tmp_path_factory.mktemp("llama_fp16"), torch.float16)


def _low_precision_case(base, tmp_path, configs, weights, dtype):
    """(ours, float32 reference on the upcast base, peft's own low-precision merge, merge report)."""
    upcast = cast_base(base, tmp_path / "upcast", torch.float32)
    adapters = [make_adapter(upcast, tmp_path / f"a{i}", c, seed=i + 1) for i, c in enumerate(configs)]
    pairs = list(zip(adapters, weights))
    report = merge(base, pairs, tmp_path / "out")
    return read_folder(tmp_path / "out"), peft_merged(upcast, pairs), peft_merged(base, pairs, dtype), report


LOW_PRECISION_CASES = {
    "lora": ([LORA], [1.0]),
    "dora": ([DORA], [1.0]),
    "two_weighted": ([LORA, DORA], [0.6, 0.9]),
    "ia3": ([peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])], [1.0]),
    "vera": ([peft.VeraConfig(r=4, target_modules=["q_proj", "up_proj"])], [1.0]),
    "loha": ([peft.LoHaConfig(r=4, target_modules=["q_proj", "down_proj"])], [1.0]),
    "lokr": ([peft.LoKrConfig(r=4, target_modules=["v_proj"])], [1.0]),
    "hira": ([peft.HiraConfig(r=4, target_modules=["q_proj", "down_proj"])], [1.0]),
}


@pytest.mark.parametrize("case,dtype", [(c, torch.bfloat16) for c in LOW_PRECISION_CASES]
                         + [(c, torch.float16) for c in ("lora", "dora", "two_weighted")])
def test_low_precision_base_rounds_once(case, dtype, tiny_llama_bf16, llama_fp16, tmp_path):
    base = tiny_llama_bf16 if dtype == torch.bfloat16 else llama_fp16
    configs, weights = LOW_PRECISION_CASES[case]
    ours, ref32, theirs, report = _low_precision_case(base, tmp_path, configs, weights, dtype)
    assert report.merged > 0
    for name, tensor in ours.items():
        assert tensor.dtype == dtype
        assert torch.equal(tensor, ref32[name].to(dtype)), name  # round(W.float() + ΔW_fp32), exactly
        ours_err = (tensor.float() - ref32[name]).abs()
        assert (ours_err <= (theirs[name].float() - ref32[name]).abs()).all(), name


def test_two_adapters_in_bf16_are_strictly_closer_than_peft(tiny_llama_bf16, tmp_path):
    """peft rounds to bf16 after each adapter; surgeon once: here that visibly matters."""
    ours, ref32, theirs, _ = _low_precision_case(tiny_llama_bf16, tmp_path, [LORA, LORA], [1.0, -0.5], torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (ours[name].float() - ref32[name]).abs().sum() < (theirs[name].float() - ref32[name]).abs().sum()


def test_untouched_tensors_are_byte_identical_and_provenance_recorded(tiny_llama_bf16, tmp_path):
    adapter = make_adapter(tiny_llama_bf16, tmp_path / "a", LORA)
    report = merge(tiny_llama_bf16, [adapter], tmp_path / "out", dtype="bf16")
    merged = {e.name for e in report.entries}
    assert report.cast_only == 0 and report.copied == report.tensors - len(merged)
    with Checkpoint.open(tiny_llama_bf16) as base, Checkpoint.open(tmp_path / "out") as out:
        for name in base.keys():
            assert (out.read_raw(name) == base.read_raw(name)) == (name not in merged), name
        assert out.metadata["surgeon_command"] == "merge"
    record = json.loads((tmp_path / "out" / "surgeon_provenance.json").read_text())
    assert record["command"] == "merge" and record["report"]["merged"] == report.merged
    assert record["parameters"]["adapters"][0]["peft_type"] == "LORA"
    for side in ("config.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (tmp_path / "out" / side).read_bytes() == (tiny_llama_bf16 / side).read_bytes()


def test_fp16_output_of_fp32_model_reports_cast_only_not_changed(tiny_llama, tmp_path):
    """The seed finding: a merge in fp16 made untouched parameters look changed. Here they are 'cast only'."""
    adapter = make_adapter(tiny_llama, tmp_path / "a", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    report = merge(tiny_llama, [adapter], tmp_path / "out", dtype="fp16", precision_report=tmp_path / "p.json")
    assert report.merged == 2 and report.cast_only == report.tensors - 2 and report.copied == 0
    got, reference = read_folder(tmp_path / "out"), peft_merged(tiny_llama, [(adapter, 1.0)])
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name].to(torch.float16)), name  # merge in fp32, one rounding
    payload = json.loads((tmp_path / "p.json").read_text())
    assert [t["name"] for t in payload["tensors"]] == [e.name for e in report.entries if e.action == "merged"]
    assert len(payload["cast_only"]) == report.cast_only
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"


def test_precision_report_measures_a_vanishing_delta(tiny_llama_bf16, tmp_path):
    """ΔW far below half a bf16 ulp mostly vanishes: the report says how much, and warns.

    The exact W + ΔW is peft's float32 merge_and_unload on the exactly upcast base, not surgeon's.
    """
    adapter = make_adapter(tiny_llama_bf16, tmp_path / "a", peft.LoraConfig(r=2, target_modules=["q_proj"]), scale=1e-5)
    report = merge(tiny_llama_bf16, [adapter], tmp_path / "out", precision_report=tmp_path / "p.json")
    exact_all = peft_merged(cast_base(tiny_llama_bf16, tmp_path / "upcast", torch.float32), [(adapter, 1.0)])
    base = read_folder(tiny_llama_bf16)
    assert sorted(e.name for e in report.entries) == sorted(
        n for n in base if not torch.equal(exact_all[n], base[n].float()))
    for entry in report.entries:
        exact = exact_all[entry.name].double()
        stored = base[entry.name].double()
        rounded = exact.to(torch.bfloat16).double()
        lost = (rounded - exact).norm() / (exact - stored).norm()
        assert entry.lost_fraction == pytest.approx(float(lost), rel=1e-4)
        assert entry.changed == int((rounded != stored).sum())
        assert entry.lost_fraction > 0.5 and entry.warning is not None and "--dtype fp32" in entry.warning
    assert len(report.warnings) == 2
    wide = merge(tiny_llama_bf16, [adapter], tmp_path / "wide", dtype="fp32")
    assert not wide.warnings
    assert all(e.lost_fraction == 0 and e.changed == e.numel for e in wide.entries if e.action == "merged")


def test_non_finite_result_is_an_error_naming_the_tensor(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "a", peft.LoraConfig(r=2, target_modules=["down_proj"]), scale=300.0)
    with pytest.raises(NumericalError, match=r"^model\.layers\.0\.mlp\.down_proj\.weight: the merge \(lora\(a0\)\) produced "
                                             r"[\d,]+ non-finite values in F16"):
        merge(tiny_llama, [adapter], tmp_path / "out", dtype="fp16")
    assert not (tmp_path / "out").exists()


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


@pytest.mark.parametrize("fixture,config,dtype,tol", [
    ("tiny_llama", DORA, torch.float32, 1e-5),
    ("tiny_llama", peft.LoraConfig(r=4, target_modules=["embed_tokens", "o_proj"], modules_to_save=["lm_head"]),
     torch.float32, 1e-5),
    ("tiny_gpt2", peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True), torch.float32, 1e-5),
    ("tiny_bert", peft.LoraConfig(r=4, target_modules=["query", "value"], lora_bias=True, task_type="SEQ_CLS"),
     torch.float32, 1e-5),
    ("tiny_llama_bf16", LORA, torch.bfloat16, 0.05),
])
def test_merged_folder_loads_in_transformers_with_the_same_logits(fixture, config, dtype, tol, request, tmp_path):
    base = request.getfixturevalue(fixture)
    adapter = make_adapter(base, tmp_path / "a", config)
    merge(base, [adapter], tmp_path / "out", max_shard_size="20KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _logits(peft_model(base, [(adapter, 1.0)], dtype), tokens)
    got = _logits(load_model(tmp_path / "out", dtype), tokens)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=0, atol=tol * max(1.0, float(expected.abs().max())))
