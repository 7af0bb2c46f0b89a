"""What `surgeon merge` supports is said in one place (surgeon.io.adapter's type lists, shown by
`surgeon inspect --merge-support`), and the README's support list is that text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import peft
import torch
from click.testing import CliRunner

from _merge_helpers import make_adapter
from surgeon.cli.main import cli
from surgeon.io.adapter import FAST_TYPES, PEFT_LAYER_TYPES, PROMPT_LEARNING_TYPES, RUNTIME_ONLY_TYPES
from surgeon.workflows.inspect import merge_support_text
from surgeon.workflows.merge import module_plan

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_support_list_is_the_codes():
    text = README.read_text("utf-8")
    block = re.search(r"<!-- merge-support:start -->\n(.*?)\n<!-- merge-support:end -->", text, re.S)
    assert block, "README lacks the merge-support block"
    assert block.group(1).strip() == merge_support_text().strip()


def test_every_peft_type_is_placed_once():
    """Each type the installed peft knows is merged by one route or refused; none twice, none forgotten
    (SHADOW: peft's custom-model matrix does not test it; surgeon tries peft's layer code on it)."""
    from peft.utils import PeftType

    lists = [FAST_TYPES, PEFT_LAYER_TYPES, PROMPT_LEARNING_TYPES, RUNTIME_ONLY_TYPES]
    placed = [t for group in lists for t in group]
    assert len(placed) == len(set(placed))
    assert {t.value for t in PeftType} - set(placed) == {"SHADOW"}
    assert set(module_plan.FAST_TYPES) == set(FAST_TYPES)


def test_inspect_names_how_each_adapter_merges(tiny_llama, tmp_path):
    lora = make_adapter(tiny_llama, tmp_path / "lora", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    oft = make_adapter(tiny_llama, tmp_path / "oft", peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"]))
    tokens = make_adapter(tiny_llama, tmp_path / "tokens",
                             peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2]))
    expected = {lora: "surgeon's streamed fast path", oft: "peft's own layer code, one module at a time",
                tokens: "peft's own layer code, one module at a time"}
    for folder, route in expected.items():
        result = CliRunner().invoke(cli, ["inspect", str(folder)])
        assert result.exit_code == 0, result.output
        assert f"merge:        {route}" in result.output
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(oft), "--json"]).stdout)
    assert data["adapter"]["merge_route"] == "peft"
    support = json.loads(CliRunner().invoke(cli, ["inspect", "--merge-support", "--json"]).stdout)["merge_support"]
    assert "OFT" in support["peft"] and "LORA" in support["fast"] and "PROMPT_TUNING" in support["none"]


def test_an_oft_adapter_on_llama_merges_like_peft(tiny_llama, tmp_path):
    """The peft-layer route on a real architecture (not only the matrix's toy models), bf16 output."""
    from _merge_helpers import peft_merged, read_folder

    oft = make_adapter(tiny_llama, tmp_path / "oft",
                       peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "down_proj"]))
    result = CliRunner().invoke(cli, ["-q", "merge", str(tiny_llama), str(oft), "-o", str(tmp_path / "out"),
                                      "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    reference, got = peft_merged(tiny_llama, [(oft, 1.0)]), read_folder(tmp_path / "out")
    assert sorted(got) == sorted(reference)
    changed = [n for n in got if not torch.equal(got[n], read_folder(tiny_llama)[n].float())]
    assert changed and all("q_proj" in n or "down_proj" in n for n in changed)
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name
