"""`--push-to` on the real merge and apply commands, end to end against FakeHub."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from _hub_helpers import WRITE_TOKEN, FakeHub, fake_hub  # noqa: F401 - fake_hub is a fixture

from surgeon.cli.main import cli


def _lora(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(out)
    return out


def test_merge_push_to(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    adapter = _lora(tiny_llama, tmp_path / "lora")
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(tiny_llama), str(adapter), "-o", str(out),
                                      "--push-to", "tester/merged", "--token", WRITE_TOKEN, "--json"])
    assert result.exit_code == 0, result.output
    pushed = json.loads(result.stdout)["push"]
    assert pushed["commit_oid"] == fake_hub.head("tester/merged")
    files = fake_hub.files("tester/merged")
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert "surgeon" in card and "merge" in card
    assert WRITE_TOKEN not in result.output


def _task_vector(base: Path, tmp_path: Path) -> Path:
    """A real task vector: `surgeon diff` of the base with one tensor changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    tuned = tmp_path / "tuned"
    shutil.copytree(base, tuned)
    weights = load_file(tuned / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], 2.0)
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(cli, ["diff", str(tuned), str(base), "-o", str(tmp_path / "tv")])
    assert result.exit_code == 0, result.output
    return tmp_path / "tv"


def test_apply_push_to_refused_before_work_without_token(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path,
                                                         monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    tv = _task_vector(tiny_llama, tmp_path)
    out = tmp_path / "applied"
    result = CliRunner().invoke(cli, ["apply", str(tiny_llama), f"{tv}:1", "-o", str(out), "--push-to", "tester/applied"])
    assert result.exit_code == 1
    assert result.output == ("Error: tester/applied: pushing needs a Hub token with write access; set HF_TOKEN, "
                             "pass --token, or run `hf auth login`.\n")
    assert not out.exists() and "tester/applied" not in fake_hub.repos
    # the same command with a token: the token was the only thing missing
    result = CliRunner().invoke(cli, ["apply", str(tiny_llama), f"{tv}:1", "-o", str(out), "--push-to", "tester/applied",
                                      "--token", WRITE_TOKEN])
    assert result.exit_code == 0, result.output
    assert fake_hub.files("tester/applied")["model.safetensors"] == (out / "model.safetensors").read_bytes()


def test_scale_intruders_push_to_records_the_surgery(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_llama, tuned)
    weights = load_file(tuned / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    w = weights[name]
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(w.shape[0], generator=gen), torch.randn(w.shape[1], generator=gen)
    weights[name] = w + 3 * torch.linalg.matrix_norm(w, 2) * torch.outer(a / a.norm(), b / b.norm())
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "repaired"
    result = CliRunner().invoke(cli, ["scale-intruders", str(tuned), "--base", str(tiny_llama), "--lambda", "0.5",
                                      "-o", str(out), "--push-to", "tester/repaired", "--token", WRITE_TOKEN,
                                      "--json", "--no-cache"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["push"]["commit_oid"] == fake_hub.head("tester/repaired")
    files = fake_hub.files("tester/repaired")
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert "scale-intruders" in card and "model.layers.0" in card
