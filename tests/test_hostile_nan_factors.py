"""Issue 15: NaN/Inf inside adapter factors (lora_A, lora_B) and task vectors. Every command that reads
them fails with one `Error:` line naming the file and the tensor (not "max error inf", not an SVD that
fails to converge, not a report of "0 intruders" with c_j = nan), writes nothing, and leaves every
input byte for byte as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _hostile_helpers import digest, inputs_of, invoke, leftovers, one_line, world  # noqa: F401

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


def poisoned(src: Path, dst: Path, name: str, value: float) -> Path:
    """A copy of ``src`` whose tensor ``name`` (in its one safetensors file) holds one ``value``."""
    shutil.copytree(src, dst)
    (file,) = [p for p in dst.iterdir() if p.suffix == ".safetensors"]
    tensors = load_file(str(file))
    assert name in tensors, sorted(tensors)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[5] = value
    save_file(tensors, str(file), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def bad(world, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("nan-factors")
    out = {"nan_a": poisoned(world["adapter"], root / "nan-a", A, float("nan")),
           "inf_b": poisoned(world["adapter"], root / "inf-b", B, float("inf"))}
    tv_file = next(p for p in world["tv"].iterdir() if p.suffix == ".safetensors")
    first = sorted(load_file(str(tv_file)))[0]
    out["tv_name"] = first
    out["nan_tv"] = poisoned(world["tv"], root / "nan-tv", first, float("nan"))
    out["root"] = root
    return out


def named(bad, key):
    name = A if key == "nan_a" else B
    return (f"{bad[key] / 'adapter_model.safetensors'}: tensor {name!r} holds 1 NaN/Inf value(s)",
            "the adapter is corrupt or its training diverged")


def unchanged(world, bad):  # noqa: F811
    return {**inputs_of(world), **digest(bad["nan_a"], bad["inf_b"], bad["nan_tv"])}


@pytest.mark.parametrize("key", ["nan_a", "inf_b"])
def test_diff_adapter_check_names_the_factor(world, bad, key):  # noqa: F811
    before = unchanged(world, bad)
    one_line(invoke("diff", world["merged"], world["base"], "--adapter", bad[key]), 1, *named(bad, key))
    assert unchanged(world, bad) == before


@pytest.mark.parametrize("key", ["nan_a", "inf_b"])
def test_merge_names_the_factor_and_writes_nothing(world, bad, tmp_path, key):  # noqa: F811
    before = unchanged(world, bad)
    out = tmp_path / "new" / "merged"
    one_line(invoke("merge", world["base"], bad[key], "-o", out), 1, *named(bad, key))
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []
    assert unchanged(world, bad) == before


@pytest.mark.parametrize("args", [[], ["--method", "svd", "--svd-rank", "2"], ["--method", "ties", "--density", "0.5"]])
def test_combine_with_a_nan_input_names_the_factor(world, bad, tmp_path, args):  # noqa: F811
    before = unchanged(world, bad)
    out = tmp_path / "combined"
    one_line(invoke("combine", world["adapter"], bad["nan_a"], *args, "-o", out), 1, *named(bad, "nan_a"))
    assert not out.exists() and unchanged(world, bad) == before


def test_one_nan_adapter_converted_alone_names_the_factor(world, bad, tmp_path):  # noqa: F811
    one_line(invoke("combine", bad["inf_b"], "--method", "svd", "--svd-rank", "2", "-o", tmp_path / "c"), 1,
             *named(bad, "inf_b"))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("args", [["{nan_a}"], ["--adapter", "{nan_a}"], ["{merged}", "{nan_a}", "--sequence"],
                                  ["{merged}", "{nan_a}"]])
def test_intruders_of_a_nan_adapter_is_an_error(world, bad, args):  # noqa: F811
    paths = {"nan_a": bad["nan_a"], "merged": world["merged"]}
    one_line(invoke("intruders", *[a.format(**paths) for a in args], "--base", world["base"]), 1, *named(bad, "nan_a"))


def test_scale_intruders_of_a_nan_adapter_writes_nothing(world, bad, tmp_path):  # noqa: F811
    for args in (["--adapter", bad["nan_a"]], [world["merged"], bad["nan_a"], "--sequence-from", "2"]):
        out = tmp_path / "fixed"
        one_line(invoke("scale-intruders", *args, "--base", world["base"], "--lambda", "0", "-o", out), 1,
                 *named(bad, "nan_a"))
        assert not out.exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_apply_of_a_nan_task_vector_names_the_tensor(world, bad, tmp_path, method):  # noqa: F811
    before = unchanged(world, bad)
    out = tmp_path / "applied"
    extra = ["--density", "0.5"] if method != "task_arithmetic" else []
    one_line(invoke("apply", world["base"], bad["nan_tv"], "--method", method, *extra, "-o", out), 1,
             f"tensor {bad['tv_name']!r} would be written with", "NaN/Inf", "--allow-non-finite")
    assert not out.exists() and unchanged(world, bad) == before


def test_extract_lora_of_a_tuned_model_with_nan(world, bad, tmp_path):  # noqa: F811
    model = next(p for p in world["merged"].iterdir() if p.suffix == ".safetensors")
    name = next(k for k in sorted(load_file(str(model))) if "q_proj" in k)
    broken = poisoned(world["merged"], tmp_path / "merged-nan", name, float("nan"))
    out = tmp_path / "extracted"
    one_line(invoke("extract-lora", broken, world["base"], "-r", "2", "-o", out), 1,
             f"tensor {name!r} holds 1 NaN/Inf value(s)")
    assert not out.exists()


def test_a_finite_adapter_still_merges_exactly(world, tmp_path):  # noqa: F811
    out = tmp_path / "merged"
    result = invoke("merge", world["base"], world["adapter"], "-o", out, "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    mine = load_file(str(next(p for p in out.iterdir() if p.suffix == ".safetensors")))
    peft = load_file(str(next(p for p in world["merged"].iterdir() if p.suffix == ".safetensors")))
    for key, value in peft.items():
        torch.testing.assert_close(mine[key].float(), value.float(), rtol=1e-5, atol=1e-6)
