"""Class 7 of issue 15: messages that say what to do, and say the right thing; one line even for a
file name with a newline; a failed run into -o new/a/b/out leaves no empty parents."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from _hostile_helpers import digest, inputs_of, invoke, leftovers, one_line, world  # noqa: F401


def _adapter_with(world, tmp_path, **changes):  # noqa: F811
    folder = tmp_path / "adapter"
    shutil.copytree(world["adapter"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_corrupt_header_says_what_to_do(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}).encode()
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    one_line(invoke("inspect", f), 1, f"{f}: tensor 'w' has invalid shape [-2]; the file is corrupt; download it again, "
             "or re-save it with safetensors (save_file, save_pretrained) from the tool that wrote it.")


@pytest.mark.parametrize("changes,message", [
    ({"r": "four"}, "'r' is 'four', not a number; write it as a number (e.g. \"r\": 8)"),
    ({"lora_alpha": "16"}, "'lora_alpha' is '16', not a number"),
    ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern['q_proj'] is 'big', not a number"),
    ({"rank_pattern": ["q_proj"]}, "'rank_pattern' is ['q_proj'], not an object of pattern -> number"),
])
def test_adapter_config_numbers(world, tmp_path, changes, message):  # noqa: F811
    adapter = _adapter_with(world, tmp_path, **changes)
    before = digest(adapter) | inputs_of(world)
    out = tmp_path / "new" / "a" / "b" / "out"
    one_line(invoke("merge", world["base"], adapter, "-o", out), 1, f"{adapter / 'adapter_config.json'}: {message}",
             "re-save the adapter with peft's save_pretrained")
    assert not (tmp_path / "new").exists()  # the parents made for -o went away with the failed run
    assert digest(adapter) | inputs_of(world) == before


def test_adapter_config_that_is_a_json_list(world, tmp_path):  # noqa: F811
    folder = tmp_path / "adapter"
    shutil.copytree(world["adapter"], folder)
    (folder / "adapter_config.json").write_text("[1, 2]")
    one_line(invoke("merge", world["base"], folder, "-o", tmp_path / "out"), 1,
             f"{folder / 'adapter_config.json'}: expected a JSON object, found a list; re-save the adapter with peft's "
             "save_pretrained or re-download it.")


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_diff_tolerance_must_be_a_finite_non_negative_number(world, value):  # noqa: F811
    one_line(invoke("diff", world["merged"], world["base"], "--adapter", world["adapter"], "--tolerance", value), 1,
             f"--tolerance {float(value)}: give a finite relative error of 0 or more, e.g. --tolerance 1e-4.")


@pytest.mark.parametrize("command", [["spectrum", "{base}"], ["extract-lora", "{merged}", "{base}", "-r", "2", "-o", "{out}"]])
def test_invalid_regex_in_targets(world, tmp_path, command):  # noqa: F811
    names = {"base": world["base"], "merged": world["merged"], "out": tmp_path / "out"}
    one_line(invoke(*(str(a).format(**names) for a in command), "--targets", "layers.(q"), 1,
             "--targets 'layers.(q' is ", "valid regular expression (missing ), unterminated subpattern at position 7)", "e.g. --targets '")
    assert not (tmp_path / "out").exists()


def test_finetune_full_with_a_rank_is_refused(world, tmp_path):  # noqa: F811
    one_line(invoke("finetune", world["base"], "--data", world["data"] / "train.jsonl", "--method", "full", "--rank", "4",
                    "-o", tmp_path / "out"), 1, "--rank, --alpha and --targets are for adapter methods")


def test_a_newline_in_a_file_name_keeps_the_message_on_one_line(world, tmp_path):  # noqa: F811
    odd = tmp_path / "two\nlines"
    odd.mkdir()
    (odd / "keep.txt").write_text("x")
    line = one_line(invoke("convert", world["base"], "-o", odd), 1, "output folder is not empty")
    assert "two\\nlines" in line
    missing = tmp_path / "no\nsuch"  # a message from a reader, not from the output rules
    assert "no\\nsuch: no such file or folder" in one_line(invoke("inspect", missing), 1)


def test_failed_write_leaves_no_empty_parents(world, tmp_path):  # noqa: F811
    """The failure comes after the parents were made (NaN refused while writing): they go too."""
    from safetensors.torch import load_file, save_file

    nan = tmp_path / "nan"
    shutil.copytree(world["base"], nan)
    tensors = load_file(nan / "model.safetensors")
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    one_line(invoke("convert", nan, "-o", tmp_path / "new" / "a" / "b" / "out", "--dtype", "fp16"), 1,
             "tensor 'model.norm.weight' would be written with 1 NaN/Inf value(s)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]


def test_apply_refuses_model_weights_given_as_a_task_vector(world, tmp_path):  # noqa: F811
    """A bare shard of a model (a subset of the base's tensors, no task-vector mark) would be added to the
    base, doubling those weights."""
    from safetensors.torch import load_file, save_file

    weights = load_file(world["base"] / "model.safetensors")
    shard = tmp_path / "model-00001-of-00002.safetensors"
    save_file({k: weights[k] for k in sorted(weights)[:6]}, shard, metadata={"format": "pt"})
    one_line(invoke("apply", world["base"], shard, "-o", tmp_path / "out"), 1,
             f"{shard}: looks like model weights, not a task vector", "surgeon diff TUNED BASE -o TV")
    assert not (tmp_path / "out").exists()
    tau = {k: 0.01 * torch_randn_like(weights[k]) for k in sorted(weights)[:6]}  # a real (bare) τ still applies
    save_file(tau, tmp_path / "tau.safetensors", metadata={"format": "pt"})
    assert invoke("apply", world["base"], tmp_path / "tau.safetensors", "-o", tmp_path / "ok").exit_code == 0


def torch_randn_like(t):
    import torch

    return torch.randn(t.shape, generator=torch.Generator().manual_seed(0), dtype=t.dtype)


def test_continue_from_an_adapter_of_another_architecture(tmp_path):
    from _finetune_helpers import build_model, lm_rows, write_jsonl

    llama, gpt2 = build_model("llama", tmp_path / "llama"), build_model("gpt2", tmp_path / "gpt2")
    data = write_jsonl(tmp_path / "lm.jsonl", lm_rows(8, 0))
    common = ["--data", data, "--task", "causal-lm", "--method", "lora", "--epochs", "1", "--batch-size", "8"]
    assert invoke("finetune", llama, *common, "-o", tmp_path / "stage1").exit_code == 0
    before = digest(tmp_path / "stage1", gpt2)
    one_line(invoke("finetune", gpt2, *common, "--continue-from", tmp_path / "stage1", "-o", tmp_path / "stage2"), 1,
             f"{tmp_path / 'stage1'}: 14 of the 14 modules it adapts are not in {gpt2}",
             "it was trained on another architecture. Continue from an adapter of this base")
    assert digest(tmp_path / "stage1", gpt2) == before and not (tmp_path / "stage2").exists()
