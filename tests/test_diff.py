"""`surgeon diff`: τ of peft merges and fine-tunes, classified against hand-computable answers."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _diff_fixtures import lora, merged16, merged32  # noqa: F401 - module fixtures
from _diff_helpers import LLAMA_TARGETS, float32_merge_bound, lora_delta
from surgeon.cli.main import cli
from surgeon.ops.task_vector import measure_delta, rank_stats, ulp, ulps_of
from surgeon.workflows.taskvec.diff import diff_checkpoints

LAYERS = 2
TARGET_TENSORS = {f"model.layers.{i}.{'mlp' if t == 'down_proj' else 'self_attn'}.{t}.weight"
                  for i in range(LAYERS) for t in LLAMA_TARGETS}


def test_float32_merge_task_vector_is_s_b_a_on_exactly_the_targets(tiny_llama, lora, merged32, tmp_path):
    report = diff_checkpoints(merged32, tiny_llama, tmp_path / "tau", device="cpu")
    by_status = {d.name: d.status for d in report.tensors}
    assert {n for n, s in by_status.items() if s == "changed"} == TARGET_TENSORS
    assert all(s == "identical" for n, s in by_status.items() if n not in TARGET_TENSORS)
    tau = load_file(tmp_path / "tau" / "task_vector.safetensors")
    assert set(tau) == TARGET_TENSORS == set(report.written)
    base = load_file(tiny_llama / "model.safetensors")
    for name in TARGET_TENSORS:
        expected = lora_delta(lora, name.removesuffix(".weight"))
        assert tau[name].dtype == torch.float32
        rel = float((tau[name] - expected).norm() / expected.norm())
        assert rel < 1e-6, (name, rel)
        bound = float32_merge_bound(lora, name.removesuffix(".weight"), base[name])
        assert bool(((tau[name] - expected).abs() <= bound).all()), name
        d = next(d for d in report.tensors if d.name == name)
        assert d.rank is not None and d.rank.numerical_rank == 4  # a LoRA delta has rank r
        assert d.rank.rank_99 <= 4 and d.rank.stable_rank <= 4


def test_seed_analysis_numbers_on_a_tiny_model(tiny_llama, merged32, merged16):
    """float32 merge: τ touches exactly the 6 targets (7,168 params); fp16 merge: artifacts counted."""
    s32 = diff_checkpoints(merged32, tiny_llama, ranks=False).summary
    assert (s32.changed.tensors, s32.changed.parameters) == (6, 2 * (32 * 32 + 16 * 32 + 32 * 64)) == (6, 7168)
    assert (s32.identical.tensors, s32.rounding_only.tensors) == (15, 0)
    base = load_file(tiny_llama / "model.safetensors")
    # expected from the base alone: an untouched tensor is identical iff fp16 holds it exactly
    exact = {n for n, t in base.items() if n not in TARGET_TENSORS and torch.equal(t.half().float(), t)}
    rounded = {n for n in base if n not in TARGET_TENSORS} - exact
    report16 = diff_checkpoints(merged16, tiny_llama, ranks=False)
    s16 = report16.summary
    assert {d.name for d in report16.tensors if d.status == "rounding_only"} == rounded
    assert {d.name for d in report16.tensors if d.status == "identical"} == exact
    assert {d.name for d in report16.tensors if d.status == "changed"} == TARGET_TENSORS
    assert (s16.rounding_only.tensors, s16.rounding_only.parameters) == (10, sum(base[n].numel() for n in rounded))
    assert (s16.identical.tensors, s16.changed.tensors) == (5, 6)
    assert all(d.max_ulps <= 0.5 for d in report16.tensors if d.status == "rounding_only")
    # judged at float32 precision instead, the same artifacts are real changes
    strict = diff_checkpoints(merged16, tiny_llama, ranks=False, rounding_dtype="fp32").summary
    assert strict.changed.tensors == 16 and strict.rounding_only.tensors == 0


def test_all_writes_every_float_tensor_and_provenance(tiny_llama, merged32, tmp_path):
    out = tmp_path / "tau"
    report = diff_checkpoints(merged32, tiny_llama, out, all_tensors=True, ranks=False)
    tau = load_file(out / "task_vector.safetensors")
    assert len(tau) == 21 == len(report.written)
    assert all(float(tau[n].abs().max()) == 0.0 for n in tau if n not in TARGET_TENSORS)
    with safe_open(out / "task_vector.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["surgeon_kind"] == "task_vector" and meta["surgeon_command"] == "diff"
    prov = json.loads((out / "surgeon_provenance.json").read_text())
    assert prov["report"]["summary"]["changed"]["tensors"] == 6
    assert prov["inputs"] == {"tuned": str(merged32), "base": str(tiny_llama)}


def test_hand_set_classes_and_ranks(tmp_path):
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 2))
    v, _ = torch.linalg.qr(torch.randn(6, 2))
    low_rank = (u * torch.tensor([3.0, 0.5])) @ v.T  # singular values 3 and 0.5: 97.3% of the energy in σ₁
    base = {"zero": torch.zeros(8, 6), "w": torch.randn(8, 6), "v": torch.randn(5)}
    nudged = base["w"].bfloat16()
    small = int(base["w"].abs().argmin())  # one ulp there is below ½ ulp at max |w|: needs the elementwise check
    flat = nudged.view(-1)
    flat[small] = torch.nextafter(flat[small], torch.tensor(10.0, dtype=torch.bfloat16))
    moved_big = base["w"].bfloat16()
    moved_big.view(-1)[int(base["w"].abs().argmax())] *= 2
    base["big"] = base["w"].clone()
    save_file(base, tmp_path / "base.safetensors")
    save_file({"zero": low_rank, "w": nudged, "v": base["v"].bfloat16(), "big": moved_big},
              tmp_path / "tuned.safetensors")
    r = {d.name: d for d in diff_checkpoints(tmp_path / "tuned.safetensors", tmp_path / "base.safetensors").tensors}
    assert r["v"].status == "rounding_only" and r["v"].rounding_dtype == "BF16"
    assert r["w"].status == "changed" and r["w"].beyond_rounding == 1 and 0.5 < r["w"].max_ulps <= 1.5
    assert r["big"].status == "changed" and r["big"].beyond_rounding is None  # max |τ| alone decides
    z = r["zero"].rank
    assert r["zero"].status == "changed" and z is not None
    assert (z.numerical_rank, z.rank_90, z.rank_99) == (2, 1, 2)
    assert z.stable_rank == pytest.approx(9.25 / 9, rel=1e-5)
    assert z.sigma_max == pytest.approx(3.0, rel=1e-5)
    assert rank_stats(torch.zeros(4, 3)).numerical_rank == 0


def test_non_finite_values():
    nan, inf = float("nan"), float("inf")
    base = torch.tensor([1.0, nan, inf, -inf, 2.0])
    delta, m = measure_delta(base.clone(), base, torch.float32)
    assert m.status == "identical" and torch.equal(delta, torch.zeros(5))
    tuned = base.clone()
    tuned[0] = nan
    assert measure_delta(tuned, base, torch.float32)[1].status == "changed"
    rounded = torch.tensor([1.0001, nan, inf, -inf, 2.0])
    assert measure_delta(rounded.half(), rounded, torch.float16)[1].status == "rounding_only"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_ulp_matches_nextafter(dtype):
    finfo = torch.finfo(dtype)
    gen = torch.Generator().manual_seed(0)  # the same values on every run, whatever ran before
    values = torch.cat([torch.randn(2000, generator=gen) * 10.0 ** torch.randint(-6, 4, (2000,), generator=gen),
                        torch.tensor([finfo.tiny, finfo.tiny / 8, 1.0, 2.0, -0.75])]).to(dtype)
    values = values[values.abs() < finfo.max / 2]
    up = torch.nextafter(values.abs(), torch.tensor(float("inf"), dtype=dtype))
    assert torch.equal(ulp(values, dtype), (up.double() - values.abs().double()))
    assert float(ulp(torch.zeros(1), dtype)[0]) == float(torch.nextafter(torch.zeros(1, dtype=dtype),
                                                                         torch.ones(1, dtype=dtype))[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fast_ulp_ratio_matches_float64_reference(dtype):
    torch.manual_seed(0)
    x = torch.randn(50_000) * 10.0 ** torch.randint(-40, 30, (50_000,)).float()
    x = torch.cat([x[torch.isfinite(x)], torch.tensor([0.0, 1e-45, 1e-40, 2**-126, 2**-14, 65504.0, -3e38])])
    d = torch.randn_like(x) * 10.0 ** torch.randint(-45, 10, x.shape).float()
    d[::7] = 0
    reference = (d.double().abs() / ulp(x, dtype)).masked_fill(d == 0, 0)
    fast = ulps_of(d, x, dtype).double()
    assert bool((torch.isclose(fast, reference, rtol=1e-6) | (torch.isinf(fast) & (reference > 3e38))).all())
    assert torch.equal(fast <= 0.5, reference <= 0.5)


def _mismatched_pair(tmp_path):
    base = {"a": torch.ones(2, 2), "b": torch.ones(3), "c": torch.ones(4)}
    tuned = {"a": torch.ones(2, 2) * 2, "b": torch.ones(2), "extra": torch.ones(1)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path / "tuned.safetensors", tmp_path / "base.safetensors"


def test_keys_and_shapes_on_one_side_are_listed(tmp_path):
    tuned, base = _mismatched_pair(tmp_path)
    s = diff_checkpoints(tuned, base).summary
    assert s.only_in_tuned == ["extra"] and s.only_in_base == ["c"]
    assert [(m.name, m.tuned_shape, m.base_shape) for m in s.shape_mismatches] == [("b", [2], [3])]
    assert s.changed.tensors == 1
    result = CliRunner().invoke(cli, ["diff", str(tuned), str(base)])
    assert result.exit_code == 0, result.output
    assert "only in tuned:      1 tensors  extra" in result.output
    assert "shape differs:  b: tuned [2], base [3]" in result.output


def test_strict_refuses_mismatch(tmp_path):
    tuned, base = _mismatched_pair(tmp_path)
    result = CliRunner().invoke(cli, ["diff", str(tuned), str(base), "--strict", "-o", str(tmp_path / "tau")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tuned} and {base}: 3 tensor(s) differ in name or shape (e.g. 'b' is [2] in {tuned} but [3] in "
        f"{base}); compare checkpoints of the same architecture, or drop --strict to list them and go on."]
    assert not (tmp_path / "tau").exists()


def test_cli_json_and_table(tiny_llama, merged32, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["diff", str(merged32), str(tiny_llama), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["command"] == "diff" and body["summary"]["changed"] == {"tensors": 6, "parameters": 7168}
    assert body["output"] is None and body["adapter_check"] is None
    text = runner.invoke(cli, ["diff", str(merged32), str(tiny_llama), "-o", str(tmp_path / "tau.safetensors")])
    assert text.exit_code == 0, text.output
    assert "changed:            6 tensors      7.17K params" in text.output
    assert "model.layers.0.self_attn.q_proj.weight  changed" in text.output
    assert set(load_file(tmp_path / "tau.safetensors")) == TARGET_TENSORS


def test_output_folder_not_empty_is_refused(tiny_llama, merged32, tmp_path):
    out = tmp_path / "tau"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["diff", str(merged32), str(tiny_llama), "-o", str(out)])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: {out}: output folder is not empty; choose another or pass --overwrite "
                                     "to replace it.")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_rejects_bad_rounding_dtype(tiny_llama):
    result = CliRunner().invoke(cli, ["diff", str(tiny_llama), str(tiny_llama), "--rounding-dtype", "int8"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --rounding-dtype 'int8' is not a float dtype; use auto, fp16, bf16 or fp32."


def test_help_ends_with_example():
    result = CliRunner().invoke(cli, ["diff", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output
