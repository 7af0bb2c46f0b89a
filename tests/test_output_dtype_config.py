"""A command that casts the weights writes a config.json that names the new dtype, so that transformers
(``dtype="auto"``) loads the output in the dtype it is stored in. ``merge`` always did; ``convert
--dtype`` and ``apply --dtype`` copied the old config.json and claimed float32 for bf16/fp16 weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from surgeon.cli.main import cli
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.model_config import side_files


def _run(*args: str) -> None:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output


def _stored_dtypes(folder: Path) -> set[str]:
    seen = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            seen |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    return seen


def _loads_as(folder: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {dtype}


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_convert_bf16_writes_a_config_that_says_bfloat16(tiny_llama: Path, tmp_path: Path):
    before = _config(tiny_llama)
    assert before.get("dtype", before.get("torch_dtype")) == "float32"
    out = tmp_path / "bf16"
    _run("convert", str(tiny_llama), "-o", str(out), "--dtype", "bf16")
    after = _config(out)
    key = "dtype" if "dtype" in before else "torch_dtype"
    assert after[key] == "bfloat16"
    assert {k: v for k, v in after.items() if k not in ("dtype", "torch_dtype")} == \
           {k: v for k, v in before.items() if k not in ("dtype", "torch_dtype")}  # nothing else changed
    assert _stored_dtypes(out) == {"BF16"}
    _loads_as(out, torch.bfloat16)


def test_convert_without_dtype_copies_config_json_byte_for_byte(tiny_llama: Path, tmp_path: Path):
    out = tmp_path / "same"
    _run("convert", str(tiny_llama), "-o", str(out), "--max-shard-size", "20KB")
    assert (out / "config.json").read_bytes() == (tiny_llama / "config.json").read_bytes()


def test_apply_fp16_writes_a_config_that_says_float16(tiny_llama: Path, tmp_path: Path):
    with safe_open(str(tiny_llama / "model.safetensors"), "pt") as f:
        norm = f.get_tensor("model.norm.weight")
    tau = tmp_path / "tau"
    tau.mkdir()
    save_file({"model.norm.weight": torch.full_like(norm, 0.25)}, str(tau / "model.safetensors"))
    out = tmp_path / "fp16"
    _run("apply", str(tiny_llama), f"{tau}:1", "-o", str(out), "--dtype", "fp16")
    config = _config(out)
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    assert _stored_dtypes(out) == {"F16"}
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # the task vector really was applied
        assert torch.equal(f.get_tensor("model.norm.weight"), (norm + 0.25).to(torch.float16))
    _loads_as(out, torch.float16)


def test_merge_bf16_still_writes_a_config_that_says_bfloat16(tiny_llama: Path, tmp_path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    adapter = tmp_path / "lora"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules=["q_proj"])
                   ).save_pretrained(adapter)
    out = tmp_path / "merged"
    _run("merge", str(tiny_llama), str(adapter), "-o", str(out), "--dtype", "bf16")
    config = _config(out)
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    _loads_as(out, torch.bfloat16)


# -- the helper itself, on hand-written configs -----------------------------------------------------------
def _folder(tmp_path: Path, config: dict | None) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    (folder / "tokenizer_config.json").write_text("{}")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("config", "expected"), [
    ({"model_type": "x", "torch_dtype": "float32"}, {"model_type": "x", "torch_dtype": "float16"}),  # transformers 4
    ({"model_type": "x", "dtype": "float32"}, {"model_type": "x", "dtype": "float16"}),  # transformers 5
    ({"model_type": "x", "dtype": "float32", "torch_dtype": "float32"},
     {"model_type": "x", "dtype": "float16", "torch_dtype": "float16"}),
    ({"model_type": "x"}, {"model_type": "x", "torch_dtype": "float16"}),  # no key: the one both versions read
])
def test_side_files_rewrite_every_dtype_key(tmp_path: Path, config: dict, expected: dict):
    folder = _folder(tmp_path, config)
    with Checkpoint.open(folder) as ckpt:
        copy, texts = side_files(ckpt, "F16")
    assert [p.name for p in copy] == ["tokenizer_config.json"]
    assert json.loads(texts["config.json"]) == expected


def test_side_files_copy_everything_when_nothing_changes(tmp_path: Path):
    folder = _folder(tmp_path, {"model_type": "x", "dtype": "bfloat16"})
    with Checkpoint.open(folder) as ckpt:
        assert side_files(ckpt, None) == (ckpt.extra_files(), {})
        assert side_files(ckpt, "BF16") == (ckpt.extra_files(), {})  # already says so: copied as is
        assert [p.name for p in ckpt.extra_files()] == ["config.json", "tokenizer_config.json"]


def test_a_lone_file_gets_no_config_from_its_neighbours(tmp_path: Path):
    folder = _folder(tmp_path, {"model_type": "x", "dtype": "float32"})
    with Checkpoint.open(folder / "model.safetensors") as ckpt:
        assert side_files(ckpt, "BF16") == ([], {})
