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


def test_apply_push_to_refused_before_work_without_token(fake_hub: FakeHub, tiny_llama: Path, tmp_path: Path,
                                                         monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "applied"
    result = CliRunner().invoke(cli, ["apply", str(tiny_llama), f"{tmp_path / 'missing-tv'}:1", "-o", str(out),
                                      "--push-to", "tester/applied"])
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert not out.exists() and "tester/applied" not in fake_hub.repos
