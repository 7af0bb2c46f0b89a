"""`surgeon intruders` against the authors' method: full float64 SVDs of base and tuned."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from _spectral_helpers import (bert_lora, geometric_matrix, gpt2_lora, llama_lora, plant,  # noqa: F401
                               reference_cosines, save_matrices, save_merged)
from surgeon.cli.main import cli
from surgeon.io.checkpoint import Checkpoint
from surgeon.ops import intruders as ops
from surgeon.workflows.spectral.intruders import IntruderOptions, find_intruders

NAME = "model.layers.0.mlp.proj.weight"


def _pair(tmp_path: Path, w0: torch.Tensor, wt: torch.Tensor) -> tuple[Path, Path]:
    return (save_matrices(tmp_path / "base.safetensors", {NAME: w0}, dtype=torch.float64),
            save_matrices(tmp_path / "tuned.safetensors", {NAME: wt}, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(150, 100), (100, 150)])
@pytest.mark.parametrize("method", ["krylov", "auto", "dense"])
def test_planted_intruders_found_exactly(tmp_path, shape, method):
    w0 = geometric_matrix(*shape, decay=0.85)  # σ₁(W₀) = 1, well separated
    wt = plant(w0, [4.0, 3.0, 2.0])
    base, tuned = _pair(tmp_path, w0, wt)
    report = find_intruders(tuned, base, targets="proj", use_cache=False, options=IntruderOptions(method=method))
    (row,) = report.matrices
    assert row.intruders == [1, 2, 3]
    assert all(c > 0.9 for c in row.cos_left[3:])
    assert row.sigma[:3] == pytest.approx([4.0, 3.0, 2.0], rel=0.1)
    ref, _ = reference_cosines(w0, wt, 10)
    assert row.cos_left == pytest.approx(ref, abs=1e-7)
    assert row.energy_share == pytest.approx(sum(s * s for s in row.sigma[:3]) / sum(s * s for s in row.sigma))
    assert row.sweep["0.5"] == 3 and report.totals["intruders"] == 3


def test_planted_intruder_at_an_inner_rank(tmp_path):
    w0 = geometric_matrix(120, 90, decay=0.85)  # σ = 1, 0.85, 0.7225, ...
    u0, _, v0h = torch.linalg.svd(w0, full_matrices=False)
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(120, generator=gen, dtype=torch.float64), torch.randn(90, generator=gen, dtype=torch.float64)
    a -= u0[:, :20] @ (u0[:, :20].T @ a)  # away from the top base directions, so it does not mix with them
    b -= v0h[:20].T @ (v0h[:20] @ b)
    wt = w0 + 0.79 * torch.outer(a / a.norm(), b / b.norm())  # σ between σ₂ and σ₃: rank 3 of W_t
    base, tuned = _pair(tmp_path, w0, wt)
    (row,) = find_intruders(tuned, base, targets="proj", use_cache=False).matrices
    assert row.intruders == [3]
    assert row.sigma[2] == pytest.approx(0.79, rel=0.05)


def test_small_dense_perturbation_gives_none(tmp_path):
    w0 = geometric_matrix(100, 80, decay=0.9)
    noise = torch.randn(100, 80, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    wt = w0 + 1e-3 * noise / math.sqrt(80)
    base, tuned = _pair(tmp_path, w0, wt)
    (row,) = find_intruders(tuned, base, targets="proj", use_cache=False).matrices
    assert row.intruders == [] and min(row.cos_left) > 0.95
    assert row.match_left == list(range(1, 11))  # each tuned vector is its base counterpart


def _check_against_reference(report, base_folder: Path, tuned_state: dict[str, torch.Tensor], *, transposed=False,
                             side="left", atol=1e-5) -> int:
    total = 0
    with Checkpoint.open(base_folder) as base:
        for row in report.matrices:
            w0 = base.get(row.name, dtype=torch.float64)
            wt = tuned_state[row.name].double()
            if transposed:
                w0, wt = w0.T, wt.T
            if row.status == "unchanged":
                assert torch.equal(w0, wt)
                continue
            ref, s_ref = reference_cosines(w0, wt, 10, side=side)
            ours = row.cos_left if side == "left" else row.cos_right
            assert ours == pytest.approx(ref, abs=atol), row.name
            assert row.sigma == pytest.approx(s_ref[:10].tolist(), rel=1e-5)
            assert row.intruders == [j + 1 for j, c in enumerate(ref) if c < 0.5], row.name
            total += len(row.intruders)
    return total


@pytest.mark.parametrize("method", ["auto", "krylov"])
def test_llama_lora_matches_dense_reference(tiny_llama, llama_lora, tmp_path, method):
    from _spectral_helpers import merged_state

    exact = merged_state(tiny_llama, llama_lora, kind="causal", dtype=torch.float64)
    report = find_intruders(llama_lora, tiny_llama, use_cache=False, options=IntruderOptions(method=method))
    assert report.totals["analysed"] == 10 and report.totals["unchanged"] == 4  # o_proj, up_proj untouched
    assert _check_against_reference(report, tiny_llama, exact, atol=1e-8) > 0
    if method == "krylov":
        assert set(report.methods) == {"chebyshev-lowrank", "unchanged"}
    # the same fine-tune given as a merged (float32) checkpoint takes the dense-tuned route, same answer
    state = merged_state(tiny_llama, llama_lora, kind="causal")
    merged = save_merged(tiny_llama, llama_lora, tmp_path / "merged", kind="causal")
    dense = find_intruders(merged, tiny_llama, use_cache=False, options=IntruderOptions(method=method))
    assert [r.intruders for r in dense.matrices] == [r.intruders for r in report.matrices]
    _check_against_reference(dense, tiny_llama, state, atol=1e-9)


def test_bert_lora_matches_dense_reference(tiny_bert, bert_lora):
    from _spectral_helpers import merged_state

    state = merged_state(tiny_bert, bert_lora, kind="seqcls")  # TUNED + adapter: merged in float32, as `merge` does
    report = find_intruders(tiny_bert, tiny_bert, adapter=bert_lora, use_cache=False,
                            options=IntruderOptions(method="krylov"))
    assert {r.module for r in report.matrices if r.status == "analysed"} == {
        "attention.self.query", "attention.self.value", "intermediate.dense"}
    assert _check_against_reference(report, tiny_bert, state, atol=1e-8) > 0


def test_gpt2_conv1d_is_transposed_first(tiny_gpt2, gpt2_lora):
    from _spectral_helpers import merged_state

    state = merged_state(tiny_gpt2, gpt2_lora, kind="causal", dtype=torch.float64)
    report = find_intruders(gpt2_lora, tiny_gpt2, targets="all-linear", use_cache=False)
    analysed = [r for r in report.matrices if r.status == "analysed"]
    assert {r.module for r in analysed} == {"attn.c_attn", "mlp.c_fc"}
    assert analysed[0].shape == [96, 32] and analysed[0].transposed
    _check_against_reference(report, tiny_gpt2, state, transposed=True, atol=1e-8)


@pytest.mark.parametrize("side", ["right", "both"])
def test_right_and_both_sides(tiny_llama, llama_lora, side):
    from _spectral_helpers import merged_state

    state = merged_state(tiny_llama, llama_lora, kind="causal", dtype=torch.float64)
    report = find_intruders(llama_lora, tiny_llama, targets="mlp", use_cache=False,
                            options=IntruderOptions(side=side, method="krylov"))
    with Checkpoint.open(tiny_llama) as base:
        for row in (r for r in report.matrices if r.status == "analysed"):
            w0, wt = base.get(row.name, dtype=torch.float64), state[row.name].double()
            right, _ = reference_cosines(w0, wt, 10, side="right")
            assert row.cos_right == pytest.approx(right, abs=1e-8)
            if side == "both":
                left, _ = reference_cosines(w0, wt, 10)
                assert row.intruders == [j + 1 for j in range(10) if left[j] < 0.5 and right[j] < 0.5]
            else:
                assert row.cos_left is None and row.intruders == [j + 1 for j in range(10) if right[j] < 0.5]


def test_cache_cold_then_warm(tiny_llama, llama_lora, tmp_path):
    cold = find_intruders(llama_lora, tiny_llama, cache=tmp_path / "cache")
    warm = find_intruders(llama_lora, tiny_llama, cache=tmp_path / "cache")
    assert (cold.cache["hits"], cold.cache["misses"]) == (0, 10)
    assert (warm.cache["hits"], warm.cache["misses"]) == (10, 0)
    assert [r.cos_left for r in cold.matrices] == [r.cos_left for r in warm.matrices]
    assert {r.cache for r in warm.matrices} == {"hit", "-"}
    off = find_intruders(llama_lora, tiny_llama, use_cache=False)
    assert off.cache["dir"] is None and off.cache["computed"] == 10


def test_unchanged_model_has_no_intruders(tiny_llama):
    report = find_intruders(tiny_llama, tiny_llama, use_cache=False)
    assert report.totals["unchanged"] == 14 and report.totals["intruders"] == 0
    assert set(report.methods) == {"unchanged"}


def _monte_carlo_baseline(dim: int, count: int, samples: int) -> tuple[float, float]:
    """(mean, std) of max_i |xᵀq_i| by direct sampling: x uniform on the sphere of R^dim, q_i a random orthonormal set."""
    gen = torch.Generator().manual_seed(1234)
    q, _ = torch.linalg.qr(torch.randn(dim, count, generator=gen, dtype=torch.float64))
    x = torch.randn(samples, dim, generator=gen, dtype=torch.float64)
    x /= x.norm(dim=1, keepdim=True)
    best = (x @ q).abs().max(dim=1).values
    return float(best.mean()), float(best.std())


def test_random_baseline():
    """Against closed forms and a direct Monte Carlo; the tolerance is 4 standard errors of surgeon's 1000 samples."""
    for dim in (2, 3, 10, 100):  # one direction (2/π in the plane): E|x₁| = Γ(d/2) / (√π Γ((d+1)/2)), E x₁² = 1/d
        exact = math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)
        assert ops.random_baseline(dim, 1) == pytest.approx(exact, abs=4 * math.sqrt((1 / dim - exact**2) / 1000)), dim
    assert ops.random_baseline(3, 1) == pytest.approx(0.5, abs=0.037)  # x₁ is uniform on [-1, 1] on the 2-sphere
    assert ops.random_baseline(2, 2) == pytest.approx(2 * math.sqrt(2) / math.pi, abs=0.012)  # E max(|cos θ|, |sin θ|)
    assert ops.random_baseline(1, 1) == 1.0 and ops.random_baseline(5, 9) == ops.random_baseline(5, 5)
    for dim, count, samples in ((32, 32, 20000), (64, 8, 20000), (300, 30, 5000), (512, 512, 2000)):
        mean, std = _monte_carlo_baseline(dim, count, samples)
        tol = 4 * std * (1 / math.sqrt(1000) + 1 / math.sqrt(samples))
        assert ops.random_baseline(dim, count) == pytest.approx(mean, abs=tol), (dim, count)
    assert ops.random_baseline(32, 32) > 0.4  # why ε = 0.5 means little on a 32-dim toy


def test_cli_json_and_table(tiny_llama, llama_lora, tmp_path):
    result = CliRunner().invoke(cli, ["intruders", str(llama_lora), "--base", str(tiny_llama), "--no-cache",
                                      "--targets", "qv", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["command"] == "intruders" and body["totals"]["matrices"] == 4
    row = body["matrices"][0]
    assert set(row) >= {"cos_left", "intruders", "energy_share", "baseline_left", "sweep", "sigma"}
    assert "similarity" not in row
    result = CliRunner().invoke(cli, ["intruders", "--base", str(tiny_llama), "--adapter", str(llama_lora),
                                      "--cache", str(tmp_path / "c")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "intruders (ε=0.5, top-10)" in result.output and "ε sweep:" in result.output


def test_plots(tiny_llama, llama_lora, tmp_path):
    report = find_intruders(llama_lora, tiny_llama, use_cache=False, plot=tmp_path / "figs",
                            plot_matrices=r"layers\.0\.self_attn\.q_proj")
    names = sorted(Path(p).name for p in report.plots)
    assert names == ["epsilon-sweep.png", "intruders-per-layer.png",
                     "similarity-model.layers.0.self_attn.q_proj.weight.png"]
    for path in report.plots:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors(tiny_llama, tiny_bert, llama_lora, tmp_path):
    def run(*args: str):
        return CliRunner().invoke(cli, ["intruders", *args])

    result = run("--base", str(tiny_llama))
    assert result.exit_code == 1
    assert result.output == ("Error: no fine-tune given: pass TUNED (a checkpoint or an adapter folder) or "
                             "--adapter ADAPTER.\n")
    result = run(str(llama_lora), "--base", str(tiny_llama), "--adapter", str(llama_lora))
    assert result.exit_code == 1 and "TUNED is an adapter folder and --adapter is given too" in result.output
    result = run(str(tiny_llama), "--base", str(tiny_llama), "--epsilon", "1.5")
    assert result.exit_code == 1 and result.output.startswith("Error: --epsilon 1.5: a cosine threshold must be in")
    w = geometric_matrix(40, 30)
    base = save_matrices(tmp_path / "b.safetensors", {NAME: w})
    other = save_matrices(tmp_path / "t.safetensors", {NAME: w[:, :20]})
    result = run(str(other), "--base", str(base), "--targets", "proj", "--no-cache")
    assert result.exit_code == 1
    assert f"{other}: tensor '{NAME}' is [40, 20] but [40, 30] in the base; TUNED is not a fine-tune" in result.output
    missing = save_matrices(tmp_path / "m.safetensors", {"other.weight": w})
    result = run(str(missing), "--base", str(base), "--targets", "proj", "--no-cache")
    assert result.exit_code == 1 and f"{missing}: has no tensor '{NAME}', which the base has" in result.output


def test_tuned_names_may_carry_a_prefix(tiny_bert, bert_lora, tmp_path):
    # a task model (bert.encoder...) compared with its bare encoder (encoder...): names line up by suffix
    merged = save_merged(tiny_bert, bert_lora, tmp_path / "merged", kind="seqcls")
    with Checkpoint.open(tiny_bert) as ckpt:
        encoder = {n.removeprefix("bert."): ckpt.get(n) for n in ckpt.keys() if n.startswith("bert.")}
    bare = save_matrices(tmp_path / "encoder" / "model.safetensors", encoder)
    (tmp_path / "encoder" / "config.json").write_text((tiny_bert / "config.json").read_text())
    report = find_intruders(merged, bare.parent, targets="qv", use_cache=False)
    direct = find_intruders(merged, tiny_bert, targets="qv", use_cache=False)
    assert [r.name for r in report.matrices][0] == "encoder.layer.0.attention.self.query.weight"
    assert [r.cos_left for r in report.matrices] == [r.cos_left for r in direct.matrices]


def test_spectrum_full_warms_the_intruders_cache(tiny_llama, llama_lora, tmp_path):
    from surgeon.workflows.spectral.spectrum import spectrum

    spectrum(tiny_llama, full=True, cache=tmp_path / "c")
    report = find_intruders(llama_lora, tiny_llama, cache=tmp_path / "c")
    assert (report.cache["hits"], report.cache["misses"]) == (10, 0)
