"""Class 4 of issue 15 (and the NaN cases of class 3): NaN/Inf in an input matrix, or a result that is
not finite (a NaN task vector, a λ or a cast that overflows the dtype), is one `Error:` line naming the
file or output and the tensor; where a user may want such values, --allow-non-finite writes them."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _hostile_helpers import digest, inputs_of, invoke, leftovers, one_line, world  # noqa: F401

BAD = "model.layers.0.self_attn.q_proj.weight"


def _edited(src, out, value):
    shutil.copytree(src, out)
    tensors = load_file(out / "model.safetensors")
    tensors[BAD][0, 0] = value
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def bad(world):  # noqa: F811
    root = world["root"]
    tv = root / "tv-nan"
    shutil.copytree(world["tv"], tv)
    with safe_open(world["tv"] / "task_vector.safetensors", "pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(tv / "task_vector.safetensors")
    tensors[BAD][1, 2] = float("nan")
    save_file(tensors, tv / "task_vector.safetensors", metadata=metadata)
    return {"nan": _edited(world["base"], root / "nan", float("nan")),
            "inf": _edited(world["base"], root / "inf", float("inf")),
            "big": _edited(world["base"], root / "big", 1e6), "tv_nan": tv}


def _all(world, bad):  # noqa: F811
    return digest(*bad.values()) | inputs_of(world)


@pytest.mark.parametrize("args", [
    ["diff", "{nan}", "{base}"], ["diff", "{base}", "{inf}", "-o", "{out}"], ["spectrum", "{nan}", "--full"],
    ["spectrum", "{inf}"], ["intruders", "{nan}", "--base", "{base}"], ["intruders", "{base}", "--base", "{nan}"],
    ["scale-intruders", "{nan}", "--base", "{base}", "--lambda", "0.5", "-o", "{out}"],
])
def test_non_finite_input_matrix_is_refused_by_name(world, bad, tmp_path, args):  # noqa: F811
    before = _all(world, bad)
    names = {**{k: str(v) for k, v in bad.items()}, "base": str(world["base"]), "out": str(tmp_path / "out")}
    line = one_line(invoke(*(a.format(**names) for a in args)), 1, f"tensor {BAD!r} holds 1 NaN/Inf value(s)",
                    "re-download or re-create this checkpoint.")
    assert any(str(bad[k]) in line for k in ("nan", "inf")), line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert _all(world, bad) == before


def test_apply_with_a_nan_task_vector(world, bad, tmp_path):  # noqa: F811
    before = _all(world, bad)
    out = tmp_path / "out"
    one_line(invoke("apply", world["base"], bad["tv_nan"], "-o", out), 1,
             f"{out}: tensor {BAD!r} would be written with 1 NaN/Inf value(s)", "pass --allow-non-finite")
    assert not out.exists() and leftovers(tmp_path) == []
    assert invoke("apply", world["base"], bad["tv_nan"], "-o", out, "--allow-non-finite").exit_code == 0
    assert torch.isnan(load_file(out / "model.safetensors")[BAD]).sum() == 1
    assert _all(world, bad) == before


def test_apply_with_a_lambda_that_overflows(world, bad, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    # float32 tops out near 3.4e38: 1e6 * 1e38 does not fit, the other weights (|w| < 1) do
    one_line(invoke("apply", world["base"], f"{bad['big']}:1e38", "-o", out), 1,
             f"{out}: tensor {BAD!r} would be written with 1 NaN/Inf value(s) of 1024")
    assert not out.exists()


def test_convert_to_fp16_above_65504(world, bad, tmp_path):  # noqa: F811
    before = _all(world, bad)
    out = tmp_path / "out"
    one_line(invoke("convert", bad["big"], "-o", out, "--dtype", "fp16"), 1,
             f"{out}: tensor {BAD!r} would be written with 1 NaN/Inf value(s)", "fp16 holds at most 65504")
    assert not out.exists() and leftovers(tmp_path) == []
    assert invoke("convert", bad["big"], "-o", out, "--dtype", "fp16", "--allow-non-finite").exit_code == 0
    assert load_file(out / "model.safetensors")[BAD][0, 0].item() == float("inf")
    assert _all(world, bad) == before
