"""A config that promises what the files lack is refused with one line naming the file and the key or
tensor, never merged as something else (peft's adapters, edited by hand the way broken uploads look)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from _merge_helpers import make_adapter
from surgeon.cli.main import cli
from surgeon.errors import AdapterError
from surgeon.workflows.merge import merge


@pytest.fixture(scope="module")
def lora(tiny_llama, tmp_path_factory) -> Path:
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("lora"), peft.LoraConfig(r=4, lora_alpha=8,
                                                                                      target_modules=["q_proj"]))


@pytest.fixture(scope="module")
def dora(tiny_llama, tmp_path_factory) -> Path:
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("dora"),
                        peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))


def _edited(adapter: Path, tmp_path: Path, **changes) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _refused(base: Path, adapter: Path, tmp_path: Path) -> str:
    with pytest.raises(AdapterError) as err:
        merge(base, [adapter], tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "cli")])
    assert result.exit_code != 0 and result.output.startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return message


@pytest.mark.parametrize("changes,names", [
    ({"r": "four"}, ["adapter_config.json", "'r'", "'four'"]),
    ({"r": True}, ["'r'", "True"]),
    ({"r": 2.5}, ["'r'", "2.5"]),
    ({"lora_alpha": "16"}, ["'lora_alpha'", "'16'", "number"]),
    ({"alpha_pattern": {"q_proj": "16"}}, ["alpha_pattern['q_proj']", "'16'", "number"]),
    ({"rank_pattern": {"q_proj": "4"}}, ["rank_pattern['q_proj']", "'4'", "number"]),
    ({"rank_pattern": {"q_proj": 0}}, ["rank_pattern['q_proj']", "0"]),
    ({"alpha_pattern": ["q_proj", 16]}, ["'alpha_pattern' is ", "['q_proj', 16]"]),
    ({"rank_pattern": {"q_proj": 2.5}}, ["rank_pattern['q_proj']", "2.5", "positive integer"]),
    ({"lora_alpha": float("nan")}, ["'lora_alpha'", "nan"]),
])
def test_a_string_or_nonsense_where_a_number_belongs_is_refused(tiny_llama, lora, tmp_path, changes, names):
    message = _refused(tiny_llama, _edited(lora, tmp_path, **changes), tmp_path)
    for part in names:
        assert part in message, message


def test_use_dora_without_magnitude_vectors_is_refused(tiny_llama, lora, tmp_path):
    message = _refused(tiny_llama, _edited(lora, tmp_path, use_dora=True), tmp_path)
    assert "use_dora: true" in message and "q_proj" in message and "lora_A" in message, message


def test_magnitude_vectors_without_use_dora_are_refused(tiny_llama, dora, tmp_path):
    message = _refused(tiny_llama, _edited(dora, tmp_path, use_dora=False), tmp_path)
    assert "lora_magnitude_vector" in message and "use_dora" in message, message


def test_ranks_that_disagree_between_a_and_b_are_refused(tiny_llama, lora, tmp_path):
    edited = _edited(lora, tmp_path)
    tensors = load_file(edited / "adapter_model.safetensors")
    name = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[name] = tensors[name][:, :3].contiguous()  # B has rank 3, A (and the config) rank 4
    save_file(tensors, edited / "adapter_model.safetensors")
    message = _refused(tiny_llama, edited, tmp_path)
    assert name in message, message


def test_a_sound_config_still_merges(tiny_llama, lora, dora, tmp_path):
    merge(tiny_llama, [lora], tmp_path / "a")
    merge(tiny_llama, [dora], tmp_path / "b")
