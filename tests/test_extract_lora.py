"""`surgeon extract-lora`: SVD factors that peft loads and that reproduce τ."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from _diff_helpers import full_finetune, load_causal_lm, make_lora_adapter, merge_with_peft
from surgeon.cli.main import cli
from surgeon.ops.lora_extract import choose_rank, factorize
from surgeon.workflows.taskvec.extract_lora import extract_lora


@pytest.fixture(scope="module")
def lora_merged(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    adapter = make_lora_adapter(tiny_llama, root / "adapter", r=4)
    return merge_with_peft(tiny_llama, adapter, root / "merged")


@pytest.fixture(scope="module")
def llama_ft(tiny_llama, tmp_path_factory):
    return full_finetune(tiny_llama, tmp_path_factory.mktemp("ft") / "model")


def peft_merged(base, adapter):
    """({module: rank of its loaded lora_A}, state dict of base + adapter merged by peft itself)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(base), adapter)
    ranks = {}
    for name, p in model.named_parameters():
        for key in (".lora_A.", ".lora_embedding_A."):
            if key in name:
                ranks[name.removeprefix("base_model.model.").split(key)[0]] = p.shape[0]
    return ranks, {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def rel_errors(merged, tuned_folder, base_folder):
    tuned, base = load_file(tuned_folder / "model.safetensors"), load_file(base_folder / "model.safetensors")
    return {n: float((merged[n] - tuned[n]).norm() / (tuned[n] - base[n]).norm())
            for n in tuned if not torch.equal(tuned[n], base[n])}


def measured(tuned_folder, base_folder, adapter) -> dict[str, dict[str, float]]:
    """Per LoRA module of the written adapter, measured independently of surgeon's report: its rank in the
    file, the kept share of ‖τ‖² and the Eckart–Young error from torch.linalg.svd of τ = tuned − base, and
    the error ‖τ − s·B·A‖ / ‖τ‖ of the factors read back from the file (float64)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(adapter / "adapter_model.safetensors")
    tuned, base = load_file(tuned_folder / "model.safetensors"), load_file(base_folder / "model.safetensors")
    out = {}
    for key in factors:
        for a_key, b_key, embedding in ((".lora_A.weight", ".lora_B.weight", False),
                                        (".lora_embedding_A", ".lora_embedding_B", True)):
            if not key.endswith(a_key):
                continue
            module = key.removeprefix("base_model.model.").removesuffix(a_key)
            a, b = factors[key].double(), factors[key.removesuffix(a_key) + b_key].double()
            rank = a.shape[0]
            assert rank == cfg["rank_pattern"].get(module, cfg["r"]), module
            scaling = cfg["alpha_pattern"].get(module, cfg["lora_alpha"]) / rank
            tau = (tuned[f"{module}.weight"].double() - base[f"{module}.weight"].double())
            delta = scaling * (b @ a).T if embedding else scaling * (b @ a)
            sigma2 = torch.linalg.svd(tau, full_matrices=False).S ** 2
            out[module] = {"rank": rank, "energy": float(sigma2[:rank].sum() / sigma2.sum()),
                           "svd_error": float(sigma2[rank:].sum().sqrt() / tau.norm()),
                           "error": float((tau - delta).norm() / tau.norm())}
    return out


@pytest.mark.parametrize("rank", [4, 6])
def test_rank_at_least_true_rank_reconstructs_lora_delta(tiny_llama, lora_merged, tmp_path, rank):
    report = extract_lora(lora_merged, tiny_llama, tmp_path / "a", rank=rank, device="cpu")
    assert len(report.modules) == 6 and report.modules_to_save == [] and report.dropped == []
    truth = measured(lora_merged, tiny_llama, tmp_path / "a")
    assert sorted(truth) == sorted(m.module for m in report.modules)
    for m in report.modules:  # τ has rank 4: everything kept, the factors reproduce it to float32 precision
        assert m.rank == truth[m.module]["rank"] == rank
        assert truth[m.module]["energy"] == pytest.approx(1.0, abs=1e-9) and truth[m.module]["error"] < 2e-6
        assert m.energy == pytest.approx(1.0, abs=1e-6) and m.relative_error < 2e-6
    assert report.max_relative_error == max(m.relative_error for m in report.modules)
    loaded, merged = peft_merged(tiny_llama, tmp_path / "a")
    errors = rel_errors(merged, lora_merged, tiny_llama)
    assert len(errors) == 6 and max(errors.values()) < 2e-6
    assert loaded == {m.module: rank for m in report.modules}
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (rank, rank, str(tiny_llama))
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors


def test_rank_below_true_rank_reports_truncation(tiny_llama, lora_merged, tmp_path):
    report = extract_lora(lora_merged, tiny_llama, tmp_path / "a", rank=2, device="cpu")
    truth = measured(lora_merged, tiny_llama, tmp_path / "a")
    assert sorted(truth) == sorted(m.module for m in report.modules)
    for m in report.modules:
        t = truth[m.module]
        assert m.rank == t["rank"] == 2 and t["energy"] < 0.99
        assert t["error"] == pytest.approx(t["svd_error"], rel=1e-4)  # the written factors are the best rank-2 fit
        assert m.energy == pytest.approx(t["energy"], rel=1e-5)
        assert m.relative_error == pytest.approx(t["error"], rel=1e-4)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_factors_match_truncated_svd_reference(shape):
    torch.manual_seed(0)
    delta = torch.randn(shape[0], 6) @ torch.randn(6, shape[1]) + 1e-3 * torch.randn(*shape)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    for k in (1, 3, 6, 10):
        f = factorize(delta, rank=k)
        reference = (u[:, :k] * s[:k]) @ vh[:k]
        assert f.A.shape == (k, shape[1]) and f.B.shape == (shape[0], k)
        assert float((f.B.double() @ f.A.double() - reference).norm() / reference.norm()) < 1e-6
        assert torch.allclose(f.singular_values, s, rtol=1e-9, atol=1e-9)
        # B = U√S, A = √S Vᵀ: both factors carry the same singular-value weight
        assert torch.allclose(f.B.norm(dim=0), f.A.norm(dim=1), rtol=1e-4)
    sigma = torch.tensor([3.0, 1.0, 0.0])  # energies 9, 1, 0 of 10
    assert [choose_rank(sigma, energy=e) for e in (0.5, 0.9, 0.95, 1.0)] == [1, 1, 2, 2]
    assert choose_rank(sigma, rank=5) == 3 and choose_rank(sigma, energy=1.0, max_rank=1) == 1
    assert choose_rank(torch.zeros(3), rank=2) == 0


def test_energy_gives_per_module_ranks_that_peft_honours(tiny_llama, llama_ft, tmp_path):
    report = extract_lora(llama_ft, tiny_llama, tmp_path / "a", energy=0.9, device="cpu")
    ranks = {m.module: m.rank for m in report.modules}
    assert len(set(ranks.values())) > 1
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {**{m: cfg["r"] for m in ranks}, **cfg["rank_pattern"]} == ranks
    assert all(cfg["alpha_pattern"].get(m, cfg["lora_alpha"]) == r for m, r in ranks.items())
    loaded, _ = peft_merged(tiny_llama, tmp_path / "a")
    assert loaded == ranks
    truth = measured(llama_ft, tiny_llama, tmp_path / "a")
    assert sorted(truth) == sorted(ranks)
    tuned, base = load_file(llama_ft / "model.safetensors"), load_file(tiny_llama / "model.safetensors")
    for m in report.modules:  # the smallest rank that keeps 90% of ‖τ‖², by torch.linalg.svd of τ
        tau = tuned[f"{m.module}.weight"].double() - base[f"{m.module}.weight"].double()
        share = torch.linalg.svd(tau, full_matrices=False).S.pow(2).cumsum(0)
        share = share / share[-1]
        assert share[m.rank - 1] >= 0.9 - 1e-6 and (m.rank == 1 or share[m.rank - 2] < 0.9 + 1e-6), m.module
        assert m.energy == pytest.approx(truth[m.module]["energy"], rel=1e-5)
        assert m.relative_error == pytest.approx(truth[m.module]["error"], rel=1e-3, abs=1e-6)


def test_full_rank_of_a_full_finetune_with_embeddings_and_modules_to_save(tiny_llama, llama_ft, tmp_path):
    report = extract_lora(llama_ft, tiny_llama, tmp_path / "a", rank=128, device="cpu")
    kinds = {m.module: m.kind for m in report.modules}
    assert kinds["model.embed_tokens"] == "embedding" and kinds["lm_head"] == "linear" and len(kinds) == 16
    assert report.modules_to_save == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                                      "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
                                      "model.norm"]
    _, merged = peft_merged(tiny_llama, tmp_path / "a")
    errors = rel_errors(merged, llama_ft, tiny_llama)
    assert len(errors) == 21 and max(errors.values()) < 5e-6
    assert all(errors[f"{m}.weight"] == 0.0 for m in report.modules_to_save)  # stored whole, exact


def test_gpt2_conv1d_and_dropped_biases(tiny_gpt2, tmp_path):
    tuned = full_finetune(tiny_gpt2, tmp_path / "ft")
    report = extract_lora(tuned, tiny_gpt2, tmp_path / "a", rank=200, device="cpu")
    kinds = {m.module: m.kind for m in report.modules}
    assert kinds["transformer.h.0.attn.c_attn"] == "conv1d" and kinds["transformer.wte"] == "embedding"
    assert {d.name for d in report.dropped} == {f"transformer.h.{i}.{m}.bias" for i in range(2)
                                                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    _, merged = peft_merged(tiny_gpt2, tmp_path / "a")
    errors = rel_errors(merged, tuned, tiny_gpt2)
    assert max(e for n, e in errors.items() if not n.endswith(".bias") or "ln" in n) < 5e-6
    assert all(errors[d.name] == pytest.approx(1.0) for d in report.dropped)  # listed, not represented


def test_targets_regex_and_no_modules_to_save(tiny_llama, llama_ft, tmp_path):
    report = extract_lora(llama_ft, tiny_llama, tmp_path / "a", rank=4, targets=r"q_proj$",
                          modules_to_save=False, device="cpu")
    assert [m.module for m in report.modules] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert len(report.dropped) == 19 and {d.reason for d in report.dropped} == {"modules_to_save is off"}


def test_identical_models_have_nothing_to_extract(tiny_llama, tmp_path):
    result = CliRunner().invoke(cli, ["extract-lora", str(tiny_llama), str(tiny_llama), "-r", "4",
                                      "-o", str(tmp_path / "a")])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {tiny_llama}: no tensor changed beyond rounding against {tiny_llama}, so there is nothing to "
        "extract; check that TUNED and BASE are not the same model.")
    assert not (tmp_path / "a").exists()


def test_only_non_matrix_changes_are_refused(tiny_llama, tmp_path):
    weights = load_file(tiny_llama / "model.safetensors")
    weights["model.norm.weight"] = torch.full((32,), 2.0)
    save_file(weights, tmp_path / "tuned.safetensors")
    result = CliRunner().invoke(cli, ["extract-lora", str(tmp_path / "tuned.safetensors"), str(tiny_llama),
                                      "-r", "4", "-o", str(tmp_path / "a")])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {tmp_path / 'tuned.safetensors'}: 1 tensor(s) changed (e.g. 'model.norm.weight') but none is a "
        "Linear, Conv1D or Embedding weight, and peft cannot load an adapter without a LoRA module; carry these "
        "changes with `surgeon diff -o TV` and `surgeon apply`.")


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of -r/--rank R or --energy F (e.g. -r 16 or --energy 0.99)."),
    (["-r", "4", "--energy", "0.9"], "give exactly one of -r/--rank R or --energy F (e.g. -r 16 or --energy 0.99)."),
    (["-r", "0"], "-r/--rank must be at least 1, got 0."),
    (["--energy", "1.5"], "--energy must be in (0, 1], got 1.5; 0.99 keeps 99% of ‖τ‖²."),
    (["-r", "4", "--targets", "q_(proj"],
     "--targets 'q_(proj' is not a valid regular expression (missing ), unterminated subpattern at position 2); "
     "escape special characters, e.g. --targets 'layers\\.\\d+\\..*proj'."),
])
def test_bad_options(tiny_llama, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["extract-lora", str(tiny_llama), str(tiny_llama), *args,
                                      "-o", str(tmp_path / "a")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {message}"


def test_cli_json(tiny_llama, lora_merged, tmp_path):
    result = CliRunner().invoke(cli, ["extract-lora", str(lora_merged), str(tiny_llama), "-r", "4",
                                      "-o", str(tmp_path / "a"), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["command"] == "extract-lora" and len(body["modules"]) == 6
    assert body["adapter"]["parameters"] == 2 * 4 * ((32 + 32) + (16 + 32) + (32 + 64))
    prov = json.loads((tmp_path / "a" / "surgeon_provenance.json").read_text())
    assert prov["command"] == "extract-lora" and prov["parameters"]["rank"] == 4


def test_help_ends_with_example():
    result = CliRunner().invoke(cli, ["extract-lora", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output
