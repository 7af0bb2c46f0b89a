"""`surgeon apply`: task arithmetic against a real (tiny) full fine-tune and hand-computed sums."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from _diff_helpers import full_finetune
from surgeon.cli.main import cli
from surgeon.io.checkpoint import Checkpoint
from surgeon.ops.task_vector import ulp
from surgeon.workflows.taskvec.apply import apply_task_vectors, parse_task
from surgeon.workflows.taskvec.diff import diff_checkpoints


@pytest.fixture(scope="module")
def finetuned(tiny_llama, tmp_path_factory):
    return full_finetune(tiny_llama, tmp_path_factory.mktemp("ft") / "model")


@pytest.fixture(scope="module")
def tau(finetuned, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("tau") / "tau"
    report = diff_checkpoints(finetuned, tiny_llama, out, ranks=False)
    assert report.summary.changed.tensors == 21  # a full fine-tune moves every tensor
    return out


@pytest.fixture(scope="module")
def lora_free_tuned(tiny_llama, tmp_path_factory):
    """The base with only model.norm.weight changed (to 2.0)."""
    weights = load_file(tiny_llama / "model.safetensors")
    weights["model.norm.weight"] = torch.full((32,), 2.0)
    out = tmp_path_factory.mktemp("one") / "model.safetensors"
    save_file(weights, out)
    return out


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_lambda_one_reproduces_the_finetune(tiny_llama, finetuned, tau, tmp_path):
    report = apply_task_vectors(tiny_llama, [str(tau)], tmp_path / "out")
    assert (report.computed, report.copied) == (21, 0)
    out, tuned, base = _weights(tmp_path / "out"), _weights(finetuned), _weights(tiny_llama)
    for name, t in tuned.items():
        # fl(b + fl(t − b)) is within ½ ulp(t − b) + ½ ulp(t) ≤ 1.5 ulp of max(|t|, |b|) of t; exact when
        # t and b are within a factor 2 (Sterbenz), which is most elements of a fine-tune
        err = (out[name].double() - t.double()).abs()
        assert bool((err <= 1.5 * ulp(torch.maximum(t.abs(), base[name].abs()), torch.float32)).all()), name
    exact = sum(int((out[n] == t).sum()) for n, t in tuned.items())
    assert exact / sum(t.numel() for t in tuned.values()) > 0.8
    assert (tmp_path / "out" / "config.json").read_bytes() == (tiny_llama / "config.json").read_bytes()


def test_lambda_zero_copies_the_base_byte_for_byte(tiny_llama, tau, tmp_path):
    report = apply_task_vectors(tiny_llama, [f"{tau}:0"], tmp_path / "out")
    assert (report.computed, report.copied) == (0, 21)
    with Checkpoint.open(tmp_path / "out") as out, Checkpoint.open(tiny_llama) as base:
        assert out.keys() == base.keys()
        assert all(out.read_raw(n) == base.read_raw(n) for n in base.keys())


def test_zero_tensors_of_diff_all_leave_the_base_untouched(tiny_llama, lora_free_tuned, tmp_path):
    diff_checkpoints(lora_free_tuned, tiny_llama, tmp_path / "tau", all_tensors=True, ranks=False)
    report = apply_task_vectors(tiny_llama, [tmp_path / "tau"], tmp_path / "out")
    assert (report.computed, report.copied) == (1, 20)
    with Checkpoint.open(tmp_path / "out") as out, Checkpoint.open(tiny_llama) as base:
        assert all(out.read_raw(n) == base.read_raw(n) for n in base.keys() if n != "model.norm.weight")
    assert torch.equal(_weights(tmp_path / "out")["model.norm.weight"], torch.full((32,), 2.0))


def test_bf16_finetune_is_reproduced_bit_for_bit(tiny_llama_bf16, finetuned, tmp_path):
    tuned = tmp_path / "tuned-bf16.safetensors"
    save_file({n: t.bfloat16() for n, t in _weights(finetuned).items()}, tuned)
    diff_checkpoints(tuned, tiny_llama_bf16, tmp_path / "tau", ranks=False)
    apply_task_vectors(tiny_llama_bf16, [tmp_path / "tau"], tmp_path / "out")
    with Checkpoint.open(tmp_path / "out") as out, Checkpoint.open(tuned) as ref:
        assert all(out.read_raw(n) == ref.read_raw(n) for n in ref.keys())


def test_weighted_sum_negation_and_one_rounding(tiny_llama, tau, tmp_path):
    torch.manual_seed(3)
    base = _weights(tiny_llama)
    tau1 = load_file(tau / "task_vector.safetensors")
    tau2 = {"model.norm.weight": torch.randn(32), "lm_head.weight": torch.randn(128, 32) * 0.01}
    save_file(tau2, tmp_path / "tau2.safetensors")
    apply_task_vectors(tiny_llama, [f"{tau}:-0.5", (tmp_path / "tau2.safetensors", 0.25)], tmp_path / "out",
                       dtype="bf16")
    out = _weights(tmp_path / "out")
    for name, b in base.items():
        expected = b.float().clone()
        expected.add_(tau1[name], alpha=-0.5)
        if name in tau2:
            expected.add_(tau2[name], alpha=0.25)
        assert out[name].dtype == torch.bfloat16
        assert torch.equal(out[name], expected.bfloat16()), name  # float32 sum, rounded once


@pytest.mark.parametrize("text, expected", [
    ("tau", ("tau", 1.0)), ("tau:0.5", ("tau", 0.5)), ("./a/tau:-1", ("./a/tau", -1.0)),
    ("dir:with:colon:2", ("dir:with:colon", 2.0)), ("dir:name", ("dir:name", 1.0)), ("tau:1e-1", ("tau", 0.1)),
])
def test_parse_task(text, expected):
    assert parse_task(text) == expected


def test_cli_apply_and_json(tiny_llama, tau, tmp_path):
    result = CliRunner().invoke(cli, ["apply", str(tiny_llama), f"{tau}:1", "-o", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["command"] == "apply" and body["computed"] == 21
    assert body["tasks"] == [{"path": str(tau), "weight": 1.0, "tensors": 21}]
    prov = json.loads((tmp_path / "o" / "surgeon_provenance.json").read_text())
    assert prov["command"] == "apply" and prov["parameters"]["tasks"] == [{"path": str(tau), "lambda": 1.0}]


def test_task_vector_for_another_model_is_refused(tiny_llama, tmp_path):
    save_file({"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}, tmp_path / "tv.safetensors")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["apply", str(tiny_llama), str(tmp_path / "tv.safetensors"), "-o", str(out)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {tmp_path / 'tv.safetensors'}: task vector tensor 'model.layers.9.mlp.up_proj.weight' is not in the "
        f"base {tiny_llama}; apply a task vector to the base it was diffed against.")
    assert not out.exists()


def test_task_vector_with_wrong_shape_is_refused(tiny_llama, tmp_path):
    save_file({"model.norm.weight": torch.zeros(3)}, tmp_path / "tv.safetensors")
    result = CliRunner().invoke(cli, ["apply", str(tiny_llama), f"{tmp_path / 'tv.safetensors'}:2",
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {tmp_path / 'tv.safetensors'}: tensor 'model.norm.weight' is [3] in the task vector but [32] in the "
        f"base {tiny_llama}; apply it to the base it was diffed against.")


def test_non_finite_lambda_is_refused(tiny_llama, tau, tmp_path):
    result = CliRunner().invoke(cli, ["apply", str(tiny_llama), f"{tau}:inf", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {tau}:inf: λ must be a finite number, got 'inf'; write TV:0.5 or TV:-1."


def test_help_ends_with_example():
    result = CliRunner().invoke(cli, ["apply", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output
