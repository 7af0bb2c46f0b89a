"""`surgeon apply --method ...`: fine-tunes as inputs, the dry-run plan, DARE reproducibility and kept values,
and the one-line errors (mergekit equality itself is in test_apply_methods_mergekit.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgeon.cli.main import cli
from surgeon.io.checkpoint import Checkpoint
from surgeon.workflows.taskvec.apply import apply_task_vectors
from surgeon.workflows.taskvec.diff import diff_checkpoints
from surgeon.workflows.taskvec.methods import ApplyOptions


def _finetune(base, folder, seed: float, only: str | None = None):
    weights = load_file(base / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    moved = {n: (t + 0.01 * torch.randn(t.shape, generator=gen)) if only in (None, n) else t for n, t in weights.items()}
    folder.mkdir(parents=True)
    save_file(moved, folder / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base / "config.json", folder / "config.json")
    return folder


@pytest.fixture(scope="module")
def fts(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("fts")
    return [_finetune(tiny_llama, root / f"ft{i}", 50 + i) for i in range(2)]


def _raw(folder):
    return (folder / "model.safetensors").read_bytes()


def test_a_finetune_gives_the_same_bytes_as_its_task_vector(tiny_llama, fts, tmp_path):
    diff_checkpoints(fts[0], tiny_llama, tmp_path / "tau", ranks=False)
    report = apply_task_vectors(tiny_llama, [(fts[0], 0.6), (fts[1], -0.2)], tmp_path / "a")
    apply_task_vectors(tiny_llama, [(tmp_path / "tau", 0.6), (fts[1], -0.2)], tmp_path / "b")
    assert report.kinds == ["finetune", "finetune"]
    with Checkpoint.open(tmp_path / "a") as a, Checkpoint.open(tmp_path / "b") as b:
        assert all(a.read_raw(n) == b.read_raw(n) for n in a.keys())


def test_untouched_tensors_of_a_finetune_are_copied_byte_for_byte(tiny_llama, tmp_path):
    one = _finetune(tiny_llama, tmp_path / "one", 3, only="model.norm.weight")
    report = apply_task_vectors(tiny_llama, [one], tmp_path / "out", options=ApplyOptions(method="ties", density=0.5))
    assert (report.computed, report.copied) == (1, 20)
    with Checkpoint.open(tmp_path / "out") as out, Checkpoint.open(tiny_llama) as base:
        assert all(out.read_raw(n) == base.read_raw(n) for n in base.keys() if n != "model.norm.weight")


def test_dry_run_plans_every_tensor_and_writes_nothing(tiny_llama, fts, tmp_path):
    result = CliRunner().invoke(cli, ["apply", str(tiny_llama), f"{fts[0]}:0.5", str(fts[1]), "--method", "ties",
                                      "--density", "0.3", "-o", str(tmp_path / "out"), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert not (tmp_path / "out").exists()
    with Checkpoint.open(tiny_llama) as base:
        assert [p["name"] for p in body["plan"]] == base.keys()
        assert body["bytes_written"] == sum(base.info(n).nbytes for n in base.keys())
    assert {p["action"] for p in body["plan"]} == {"merge"} and all(p["inputs"] == [0, 1] for p in body["plan"])
    assert body["parameters"]["density"] == 0.3 and body["parameters"]["normalize"] is True
    text = CliRunner().invoke(cli, ["apply", str(tiny_llama), str(fts[0]), "-o", str(tmp_path / "out"), "--dry-run"])
    assert text.exit_code == 0 and "model.norm.weight" in text.output and "nothing written" in text.output


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_same_seed_same_bytes(method, tiny_llama, fts, tmp_path):
    def run(seed, name):
        apply_task_vectors(tiny_llama, [(fts[0], 0.7), (fts[1], 0.5)], tmp_path / name,
                           options=ApplyOptions(method=method, density=0.5, epsilon=0.1, seed=seed))
        return _raw(tmp_path / name)

    first = run(4, "a")
    assert run(4, "b") == first and run(5, "c") != first
    prov = json.loads((tmp_path / "a" / "surgeon_provenance.json").read_text())
    assert prov["parameters"]["seed"] == 4 and prov["parameters"]["method"] == method
    from surgeon.io.model_card import render_card

    card = render_card(tmp_path / "a", repo_id="me/merged")  # what --push-to publishes
    assert f"| method | {method} |" in card and "| seed | 4 |" in card and "| density | 0.5 |" in card


@pytest.mark.parametrize("rescale", [False, True])
def test_dare_linear_keeps_density_and_rescales_by_the_l1_ratio(rescale, tiny_llama, fts, tmp_path):
    density, weight = 0.3, 0.7
    apply_task_vectors(tiny_llama, [(fts[0], weight)], tmp_path / "out",
                       options=ApplyOptions(method="dare_linear", density=density, rescale=rescale, seed=9))
    out, base = load_file(tmp_path / "out" / "model.safetensors"), load_file(tiny_llama / "model.safetensors")
    tuned = load_file(fts[0] / "model.safetensors")
    kept_total = count = 0
    for name, b in base.items():
        tau = tuned[name] - b
        kept = out[name] != b
        kept_total, count = kept_total + int(kept.sum()), count + b.numel()
        scale = float(tau.abs().double().sum() / tau[kept].abs().double().sum()) if rescale else 1.0
        expected = b + weight * scale * tau * kept  # mergekit: τ ⊙ M · ‖τ‖₁/‖τ ⊙ M‖₁, times the weight
        assert torch.allclose(out[name], expected, rtol=0, atol=1e-6 * float(expected.abs().max())), name
    assert abs(kept_total / count - density) < 0.01


def _fails(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output


def test_one_line_errors(tiny_llama, tiny_gpt2, fts, tmp_path):
    out = ["-o", str(tmp_path / "out")]
    base = str(tiny_llama)
    _fails(["apply", base, str(fts[0]), "--method", "ties", "--density", "1.5", *out], "--density 1.5 is outside (0, 1]")
    _fails(["apply", base, str(fts[0]), "--method", "dare_linear", "--density", "0", *out], "outside (0, 1]")
    _fails(["apply", base, str(fts[0]), str(fts[1]), "--method", "slerp", *out], "slerp interpolates two models")
    _fails(["apply", base, str(fts[0]), "--method", "model_stock", *out], "model_stock needs at least two")
    _fails(["apply", base, str(fts[0]), "--method", "della", "--density", "0.9", "--epsilon", "0.2", *out],
           "density ± epsilon inside (0, 1)")
    _fails(["apply", base, str(tiny_gpt2), *out], "is not in the base")
    other = _finetune(tiny_llama, tmp_path / "wide", 1)
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(48)
    save_file(weights, other / "model.safetensors")
    _fails(["apply", base, str(other), "--method", "ties", "--density", "0.5", *out],
           "tensor 'model.norm.weight' is [48] in the fine-tune but [32] in the base")
    assert not (tmp_path / "out").exists()


def test_combine_cli_errors_and_json(tiny_llama, tmp_path):
    from test_combine_peft import _make_lora

    a = _make_lora(tiny_llama, tmp_path / "a", r=4, alpha=8, targets=["q_proj"], seed=1)
    b = _make_lora(tiny_llama, tmp_path / "b", r=8, alpha=8, targets=["q_proj"], seed=2)
    out = ["-o", str(tmp_path / "out")]
    _fails(["combine", str(a), str(b), "--method", "linear", *out], "use --method cat")
    _fails(["combine", str(a), str(b), "--method", "ties", *out], "needs --density")
    _fails(["combine", str(a), str(b), "--method", "ties_svd", "--density", "2", *out], "outside (0, 1]")
    result = CliRunner().invoke(cli, ["combine", f"{a}:0.5", f"{b}:-1", "--method", "cat", *out, "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert (body["r"], body["combination"]) == (12, "cat") and body["adapters"][1]["weight"] == -1.0
    help_text = CliRunner().invoke(cli, ["combine", "--help"]).output
    assert help_text.split("Options:")[0].rstrip().endswith("--base ./base -o ./as-lora")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "slerp",
                                    "model_stock"])
def test_blocks_and_threads_do_not_change_a_byte(method, tiny_llama, fts, tmp_path):
    """Tiny tensors are one block each; 100-element blocks (split over the worker threads) give the same bytes."""
    inputs = [(fts[0], 0.8)] if method == "slerp" else [(fts[0], 0.8), (fts[1], 0.4)]
    opts = ApplyOptions(method=method, density=0.4, epsilon=0.1, seed=2)
    apply_task_vectors(tiny_llama, inputs, tmp_path / "one", options=opts)
    apply_task_vectors(tiny_llama, inputs, tmp_path / "many", options=opts, block_elements=100)
    assert _raw(tmp_path / "one") == _raw(tmp_path / "many")
