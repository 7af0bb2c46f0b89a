"""`surgeon diff --adapter`: τ of peft merges against the adapter's ΔW (from the merge workflow)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from _diff_fixtures import lora, merged16, merged32  # noqa: F401 - module fixtures
from _diff_helpers import perturb_adapter
from surgeon.cli.main import cli
from surgeon.workflows.taskvec.diff import diff_checkpoints

TARGETS = {f"model.layers.{i}.{'mlp' if t == 'down_proj' else 'self_attn'}.{t}.weight"
           for i in range(2) for t in ("q_proj", "v_proj", "down_proj")}


def _edited_adapter(adapter, out, *, keep=None, add_zero_k_proj=False):
    """A copy of ``adapter`` restricted to modules containing ``keep`` and/or with a zero-B k_proj added."""
    out.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    if keep is not None:
        tensors = {k: v for k, v in tensors.items() if keep in k}
        cfg["target_modules"] = [keep]
    if add_zero_k_proj:
        for i in range(2):
            prefix = f"base_model.model.model.layers.{i}.self_attn.k_proj"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, 32)
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(16, 4)
        cfg["target_modules"] = sorted(set(cfg["target_modules"]) | {"k_proj"})
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def test_true_adapter_is_equivalent_to_float32_merge(tiny_llama, lora, merged32):
    check = diff_checkpoints(merged32, tiny_llama, adapter=lora, ranks=False).adapter_check
    assert check is not None and check.equivalent
    assert {t.name for t in check.targets} == TARGETS
    assert all(t.equivalent and t.status == "changed" and t.cosine > 1 - 1e-6 for t in check.targets)
    assert check.max_relative_error < 1e-6
    assert (check.shared.tensors, check.shared.parameters) == (6, 7168)
    assert (check.task_vector_only.tensors, check.adapter_only.tensors) == (0, 0)


def test_true_adapter_is_equivalent_to_fp16_merge(tiny_llama, lora, merged16):
    report = diff_checkpoints(merged16, tiny_llama, adapter=lora, ranks=False)
    check = report.adapter_check
    assert report.summary.rounding_only.tensors == 10  # artifacts, not task-vector-only changes
    assert check.equivalent and check.task_vector_only.tensors == 0
    # fp16 rounding makes the relative error exceed the default tolerance; the ulp criterion accepts it
    assert check.max_relative_error > 1e-4
    assert all(t.relative_error <= 1e-4 or t.max_ulps <= 2.0 for t in check.targets)
    assert any(t.max_ulps is not None for t in check.targets)


@pytest.mark.parametrize("merged_fixture", ["merged32", "merged16"])
def test_perturbed_adapter_is_not_equivalent(tiny_llama, lora, merged_fixture, request, tmp_path):
    merged = request.getfixturevalue(merged_fixture)
    bad = perturb_adapter(lora, tmp_path / "bad", module_substring="v_proj", factor=1.01)
    check = diff_checkpoints(merged, tiny_llama, adapter=bad, ranks=False).adapter_check
    assert not check.equivalent
    differs = {t.name for t in check.targets if not t.equivalent}
    assert differs == {n for n in TARGETS if "v_proj" in n}
    assert all(t.relative_error == pytest.approx(0.01, rel=0.05) for t in check.targets if t.name in differs)


def test_counts_task_vector_only_and_adapter_only(tiny_llama, lora, merged32, tmp_path):
    subset = _edited_adapter(lora, tmp_path / "q", keep="q_proj")
    check = diff_checkpoints(merged32, tiny_llama, adapter=subset, ranks=False).adapter_check
    assert not check.equivalent and all(t.equivalent for t in check.targets)
    assert (check.shared.tensors, check.shared.parameters) == (2, 2048)
    assert (check.task_vector_only.tensors, check.task_vector_only.parameters) == (4, 2 * (16 * 32 + 32 * 64))
    superset = _edited_adapter(lora, tmp_path / "k", add_zero_k_proj=True)
    check = diff_checkpoints(merged32, tiny_llama, adapter=superset, ranks=False).adapter_check
    assert check.equivalent  # the extra k_proj modules add ΔW = 0
    assert (check.adapter_only.tensors, check.adapter_only.parameters) == (2, 2 * 16 * 32)
    assert {t.status for t in check.targets if "k_proj" in t.name} == {"identical"}


def test_cli_exit_codes(tiny_llama, lora, merged32, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["diff", str(merged32), str(tiny_llama), "--adapter", str(lora), "--no-rank"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip().splitlines()[-1].startswith(f"{lora}: EQUIVALENT (tolerance 0.0001; max rel. error ")
    bad = perturb_adapter(lora, tmp_path / "bad", module_substring="q_proj", factor=0.9)
    res = runner.invoke(cli, ["diff", str(merged32), str(tiny_llama), "--adapter", str(bad), "--json"])
    assert res.exit_code == 1
    body = json.loads(res.output)
    assert body["adapter_check"]["equivalent"] is False
    assert sorted(t["name"] for t in body["adapter_check"]["targets"] if not t["equivalent"]) == sorted(
        n for n in TARGETS if "q_proj" in n)
