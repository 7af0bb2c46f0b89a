"""`surgeon scale-intruders`: σ_j -> λσ_j for intruders, nothing else, checked by full SVDs of the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from _spectral_helpers import (bert_lora, geometric_matrix, gpt2_lora, llama_lora, merged_state,  # noqa: F401
                               plant, save_matrices, save_merged)
from surgeon.cli.main import cli
from surgeon.io.checkpoint import Checkpoint
from surgeon.workflows.spectral.scale_intruders import scale_intruders

NAME = "model.layers.0.mlp.proj.weight"


def _expected_spectrum(s_tuned: torch.Tensor, ranks: list[int], lam: float) -> torch.Tensor:
    s = s_tuned.clone()
    for j in ranks:
        s[j - 1] *= lam
    return s.sort(descending=True).values


def _assert_only_intruders_scaled(tuned: torch.Tensor, out: torch.Tensor, ranks: list[int], lam: float) -> None:
    s_t = torch.linalg.svdvals(tuned.double())
    s_o = torch.linalg.svdvals(out.double())
    expected = _expected_spectrum(s_t, ranks, lam)
    for j in ranks:  # each intruder: λσ_j, relative error ≤ 1e-5
        target = lam * s_t[j - 1]
        assert float((s_o - target).abs().min()) <= 1e-5 * max(float(target), 1e-12) or lam == 0
    # the whole spectrum: scaled intruders, every other σ unchanged (to float32 rounding of the output)
    torch.testing.assert_close(s_o, expected, rtol=1e-5, atol=2e-6 * float(s_t[0]))


@pytest.mark.parametrize("lam", [0.0, 0.5, 2.0])
def test_planted_intruders_scaled_exactly(tmp_path, lam):
    w0 = geometric_matrix(90, 70, decay=0.85)
    wt = plant(w0, [4.0, 3.0])
    base = save_matrices(tmp_path / "b.safetensors", {NAME: w0, "other.weight": w0[:5]})
    tuned = save_matrices(tmp_path / "t.safetensors", {NAME: wt, "other.weight": w0[:5] + 1})
    report = scale_intruders(tuned, base, tmp_path / "out.safetensors", lam=lam, targets="proj", use_cache=False)
    (change,) = report.changes
    assert change.ranks == [1, 2] and change.sigma_after == pytest.approx([lam * s for s in change.sigma_before])
    with Checkpoint.open(tmp_path / "out.safetensors") as out, Checkpoint.open(tuned) as t:
        _assert_only_intruders_scaled(t.get(NAME), out.get(NAME), [1, 2], lam)
        assert out.read_raw("other.weight") == t.read_raw("other.weight")
        assert out.metadata["surgeon_command"] == "scale-intruders"


def test_lora_model_repaired(tiny_llama, llama_lora, tmp_path):
    merged = save_merged(tiny_llama, llama_lora, tmp_path / "merged", kind="causal")
    report = scale_intruders(merged, tiny_llama, tmp_path / "out", lam=0.25, use_cache=False)
    assert report.changes, "the trained LoRA should have intruders"
    changed = {c.name: c for c in report.changes}
    with Checkpoint.open(tmp_path / "out") as out, Checkpoint.open(merged) as tuned:
        for name in tuned.keys():
            if name in changed:
                _assert_only_intruders_scaled(tuned.get(name), out.get(name), changed[name].ranks, 0.25)
            else:  # matrices without intruders (and everything else): byte-identical
                assert out.read_raw(name) == tuned.read_raw(name), name
    provenance = json.loads((tmp_path / "out" / "surgeon_provenance.json").read_text())
    assert provenance["parameters"]["lambda"] == 0.25
    assert len(provenance["report"]["changes"]) == len(report.changes)


def test_lambda_one_is_byte_identical(tiny_llama, llama_lora, tmp_path):
    merged = save_merged(tiny_llama, llama_lora, tmp_path / "merged", kind="causal")
    result = CliRunner().invoke(cli, ["scale-intruders", str(merged), "--base", str(tiny_llama), "--lambda", "1",
                                      "-o", str(tmp_path / "out"), "--no-cache"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with Checkpoint.open(tmp_path / "out") as out, Checkpoint.open(merged) as tuned:
        assert out.keys() == tuned.keys()
        assert all(out.read_raw(n) == tuned.read_raw(n) for n in tuned.keys())


def _merge(base: Path, adapter: Path, out: Path) -> None:
    result = CliRunner().invoke(cli, ["merge", str(base), str(adapter), "-o", str(out), "--dtype", "fp32", "-q"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("model, lora, kind", [("tiny_llama", "llama_lora", "causal"),
                                               ("tiny_gpt2", "gpt2_lora", "causal"),
                                               ("tiny_bert", "bert_lora", "seqcls")])
def test_as_adapter_merges_to_the_direct_output(request, tmp_path, model, lora, kind):
    base, adapter = request.getfixturevalue(model), request.getfixturevalue(lora)
    direct = scale_intruders(adapter, base, tmp_path / "direct", lam=0.0, cache=tmp_path / "c")
    as_adapter = scale_intruders(adapter, base, tmp_path / "fixed-lora", lam=0.0, as_adapter=True, cache=tmp_path / "c")
    assert [c.ranks for c in direct.changes] == [c.ranks for c in as_adapter.changes] and direct.changes
    config = json.loads((tmp_path / "fixed-lora" / "adapter_config.json").read_text())
    original = json.loads((adapter / "adapter_config.json").read_text())
    assert max([config["r"], *config["rank_pattern"].values()]) > original["r"], "repaired modules grow their rank"
    assert config["fan_in_fan_out"] == original["fan_in_fan_out"]
    _merge(base, tmp_path / "fixed-lora", tmp_path / "merged")
    tuned = merged_state(base, adapter, kind=kind)
    with Checkpoint.open(tmp_path / "direct") as a, Checkpoint.open(tmp_path / "merged") as b, \
            Checkpoint.open(base) as w0:
        assert a.keys() == b.keys()
        for name in a.keys():
            x, y = a.get(name, dtype=torch.float64), b.get(name, dtype=torch.float64)
            # the merge adds s·B'A' in float32, where s·BA and the intruders' part cancel: its rounding is
            # relative to |s·BA| (the LoRA's own change), not to the small result
            scale = float((tuned[name].double() - w0.get(name, dtype=torch.float64)).abs().max()) + float(x.abs().max())
            assert float((x - y).abs().max()) <= 2e-6 * scale, name
    # peft itself loads the written adapter and merges it to the same weights
    state = merged_state(base, tmp_path / "fixed-lora", kind=kind)
    with Checkpoint.open(tmp_path / "merged") as b:
        for change in direct.changes:
            torch.testing.assert_close(state[change.name], b.get(change.name), rtol=0, atol=1e-5)


def _tuned_by_hand(base: dict[str, torch.Tensor], adapter: Path, name: str) -> torch.Tensor:
    """W₀ + (α/r)·B·A in float64 from the adapter file (the tuned weight scale-intruders starts from)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model." + name.removesuffix(".weight")
    a, b = factors[f"{key}.lora_A.weight"].double(), factors[f"{key}.lora_B.weight"].double()
    return base[name].double() + cfg["lora_alpha"] / cfg["r"] * (b @ a)


def test_only_top_and_bf16(tiny_llama_bf16, tmp_path):
    """The written bf16 weights, read back: W_t − σ_j u_j v_jᵀ (λ = 0) for the top intruder j only, rounded once
    to bf16; LoRA targets without intruders are bf16(W_t); every other tensor is the base's bytes."""
    from _spectral_helpers import reference_cosines, train_lora
    from safetensors.torch import load_file

    lora = train_lora(tiny_llama_bf16, tmp_path / "lora", kind="causal", targets=["q_proj", "gate_proj"])
    report = scale_intruders(lora, tiny_llama_bf16, tmp_path / "out", lam=0.0, only_top=1, use_cache=False)
    full = scale_intruders(lora, tiny_llama_bf16, tmp_path / "out2", lam=0.0, use_cache=False)
    base, out = load_file(tiny_llama_bf16 / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert out.keys() == base.keys()
    targets = {n for n in base if n.endswith(("q_proj.weight", "gate_proj.weight"))}
    ranks = {c.name: c.ranks for c in report.changes}
    assert ranks and set(ranks) <= targets
    all_ranks = {c.name: c.ranks for c in full.changes}
    for name in targets:
        tuned = _tuned_by_hand(base, lora, name)
        cosines, _ = reference_cosines(base[name], tuned, 10)
        intruders = [j + 1 for j, c in enumerate(cosines) if c < 0.5]
        assert all_ranks.get(name, []) == intruders, name
        assert ranks.get(name, []) == intruders[:1], name
        expected = tuned
        if intruders:
            u, sigma, vh = torch.linalg.svd(tuned, full_matrices=False)
            j = intruders[0] - 1
            expected = tuned - sigma[j] * torch.outer(u[:, j], vh[j])
            s_out = torch.linalg.svdvals(out[name].double())
            kept = torch.cat([sigma[:j], sigma[j + 1:]])  # σ_j -> 0, every other σ stays (to bf16 rounding)
            torch.testing.assert_close(s_out[: kept.numel()], kept, rtol=0, atol=2 ** -7 * float(sigma[0]))
        assert out[name].dtype == torch.bfloat16
        err = (out[name].double() - expected).abs()
        assert (err <= 2 ** -8 * expected.abs() + 1e-6 * float(expected.abs().max())).all(), name  # ≤ ½ ulp of bf16
    for name in base.keys() - targets:
        assert torch.equal(out[name].view(torch.int16), base[name].view(torch.int16)), name


def test_errors(tiny_llama, llama_lora, tmp_path):
    def run(*args: str):
        return CliRunner().invoke(cli, ["scale-intruders", *args])

    merged = save_merged(tiny_llama, llama_lora, tmp_path / "merged", kind="causal")
    result = run(str(merged), "--base", str(tiny_llama), "--lambda", "0", "--as-adapter", "-o", str(tmp_path / "x"))
    assert result.exit_code == 1
    assert result.output == ("Error: --as-adapter writes a LoRA adapter for BASE, so TUNED must be BASE + a LoRA "
                             "adapter: give the adapter folder as TUNED (or --adapter) and no other checkpoint.\n")
    result = run(str(llama_lora), "--base", str(tiny_llama), "--lambda", "-1", "-o", str(tmp_path / "x"))
    assert result.exit_code == 1 and result.output.startswith("Error: --lambda -1.0: give a finite scale ≥ 0")
    result = run(str(llama_lora), "--base", str(tiny_llama), "--lambda", "0", "-o", str(tiny_llama))
    assert result.exit_code == 1 and "surgeon never writes over its inputs" in result.output
    assert not (tmp_path / "x").exists()
