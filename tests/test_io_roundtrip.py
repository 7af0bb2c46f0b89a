"""Reader -> writer round trips, sharding, provenance, crash safety."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from surgeon.cli.main import cli
from surgeon.io import Checkpoint, CheckpointWriter, TensorSpec, parse_size, plan_shards
from surgeon.io.writer import clean_stale_staging
from surgeon.workflows.convert import convert_checkpoint

MODELS = ["tiny_llama", "tiny_gpt2", "tiny_bert"]


def _auto_class(folder: Path):
    import transformers

    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch)


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("shard_size", ["5GB", "20KB"])
def test_roundtrip_byte_identical_and_loadable(fixture, shard_size, request, tmp_path):
    src = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    report = convert_checkpoint(src, out, max_shard_size=shard_size)
    with Checkpoint.open(src) as a, Checkpoint.open(out) as b:
        assert a.keys() == b.keys()
        for key in a.keys():
            assert a.read_raw(key) == b.read_raw(key), key
    if shard_size == "5GB":
        assert report.shards == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    else:
        assert len(report.shards) > 1
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in Checkpoint.open(src).tensors.values())
        assert sorted(set(index["weight_map"].values())) == report.shards
        assert report.shards[0] == f"model-00001-of-{len(report.shards):05d}.safetensors"
    for extra in ("config.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / extra).read_bytes() == (src / extra).read_bytes()
    cls = _auto_class(src)
    original, copy = cls.from_pretrained(src), cls.from_pretrained(out)
    for (k1, v1), (k2, v2) in zip(original.state_dict().items(), copy.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_provenance_and_permissions(tiny_llama, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(tiny_llama, out, max_shard_size="20KB")
    with Checkpoint.open(out) as ckpt:
        meta = ckpt.metadata
    assert meta["surgeon_command"] == "convert" and meta["format"] == "pt"
    assert json.loads(meta["surgeon_parameters"]) == {"dtype": "auto", "max_shard_size": "20KB"}
    record = json.loads((out / "surgeon_provenance.json").read_text())
    assert record["command"] == "convert" and record["inputs"] == {"source": str(tiny_llama)}
    umask = os.umask(0)
    os.umask(umask)
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


def test_cast_rounds_once(tiny_llama, tmp_path):
    out = tmp_path / "bf16"
    report = convert_checkpoint(tiny_llama, out, dtype="bf16")
    assert report.cast == report.tensors
    with Checkpoint.open(tiny_llama) as a, Checkpoint.open(out) as b:
        for key in a.keys():
            assert torch.equal(b.get(key), a.get(key).to(torch.bfloat16))


def test_plan_shards_by_budget():
    specs = [TensorSpec(f"t{i}", "F32", (10,)) for i in range(5)]  # 40 bytes each
    assert [len(s) for s in plan_shards(specs, 100)] == [2, 2, 1]
    assert [len(s) for s in plan_shards(specs, 10)] == [1, 1, 1, 1, 1]  # oversize tensors get their own shard
    assert parse_size("5GB") == 5_000_000_000 and parse_size("2GiB") == 2 * 2**30 and parse_size("300MB") == 300_000_000


def test_exception_mid_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    specs = [TensorSpec("a", "F32", (4,)), TensorSpec("b", "F32", (4,))]
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, specs) as writer:
            writer.write("a", torch.ones(4))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_plan_is_enforced(tmp_path):
    from surgeon.errors import CheckpointFormatError

    specs = [TensorSpec("a", "F32", (4,))]
    with pytest.raises(CheckpointFormatError, match="planned as F32\\[4\\] but is F16\\[4\\]"):
        with CheckpointWriter(tmp_path / "o", specs) as writer:
            writer.write("a", torch.ones(4, dtype=torch.float16))
    with pytest.raises(CheckpointFormatError, match="'a' was planned but never written"):
        with CheckpointWriter(tmp_path / "o", specs):
            pass
    assert list(tmp_path.iterdir()) == []


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from surgeon.io import CheckpointWriter, TensorSpec
    specs = [TensorSpec(f"t{i}", "F32", (256, 1024)) for i in range(40)]
    with CheckpointWriter(sys.argv[1], specs, max_shard_size="2MB") as w:
        for i, s in enumerate(specs):
            w.write(s.name, torch.full((256, 1024), float(i)))
            if i == 12:
                print("midway", flush=True)
            time.sleep(0.05)
""")


def test_kill_9_mid_write_leaves_no_output_and_no_stray_files(tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    out = parent / "model-out"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "midway"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # shards were anonymous files: the kernel freed them; only the (unheld) lock file stays, until the next write
    assert [p.name for p in parent.iterdir()] in ([], [".model-out.surgeon-lock"])


def test_stale_staging_from_dead_process_is_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.surgeon-staging-{dead.pid}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".other.surgeon-staging-{os.getpid()}-cafebabe"
    live.mkdir()
    clean_stale_staging(tmp_path)
    assert not stale.exists() and live.exists()


def test_inspect_text_and_json(tiny_llama, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", str(tiny_llama), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    with Checkpoint.open(tiny_llama) as ckpt:
        assert data["tensor_count"] == len(ckpt)
        assert data["parameter_count"] == sum(t.numel for t in ckpt.tensors.values())
    assert data["command"] == "inspect" and data["schema"] == 1
    assert data["format"] == "safetensors" and data["architecture"] == "LlamaForCausalLM" and data["model_type"] == "llama"
    assert data["dtypes"] == {"F32": {"tensors": data["tensor_count"], "parameters": data["parameter_count"], "bytes": data["bytes"]}}
    result = runner.invoke(cli, ["inspect", str(tiny_llama), "--tensors"])
    assert result.exit_code == 0
    assert "LlamaForCausalLM (llama)" in result.output and "model.layers.0.self_attn.q_proj.weight" in result.output


def test_inspect_peft_adapter(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=["lm_head"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "adapter"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["format"] == "peft adapter"
    adapter = data["adapter"]
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4 and adapter["alpha"] == 8
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"] and adapter["modules_to_save"] == ["lm_head"]
    assert data["tensor_count"] == 2 * 2 * 2 + 1  # 2 layers x 2 targets x (A, B) + saved lm_head


def test_sharded_inspect_counts_files(tiny_llama, tmp_path):
    out = tmp_path / "sharded"
    convert_checkpoint(tiny_llama, out, max_shard_size="20KB")
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(out), "--json"]).output)
    assert data["format"] == "sharded safetensors" and len(data["files"]) > 1


def test_cli_version_and_every_command_has_help_with_example():
    runner = CliRunner()
    from surgeon import __version__

    assert runner.invoke(cli, ["--version"]).output.strip() == f"surgeon, version {__version__}"
    names = cli.list_commands(None)
    assert "inspect" in names and "convert" in names
    for name in names:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example" in result.output.split("Options:")[0], f"{name} --help lacks an example"


def test_usage_error_exit_code_2(tmp_path):
    result = CliRunner().invoke(cli, ["convert", str(tmp_path)])
    assert result.exit_code == 2 and "Missing option '-o'" in result.output


def test_progress_hidden_when_not_a_tty(tiny_llama, tmp_path):
    result = subprocess.run([sys.executable, "-m", "surgeon", "convert", str(tiny_llama), "-o", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 0
    assert "\r" not in result.stderr and "it/s" not in result.stderr


def test_fallback_without_o_tmpfile(tiny_llama, tmp_path, monkeypatch):
    """Filesystems without O_TMPFILE stage shards in a hidden folder; the result is the same."""
    monkeypatch.delattr(os, "O_TMPFILE")
    out = tmp_path / "out"
    convert_checkpoint(tiny_llama, out, max_shard_size="20KB")
    with Checkpoint.open(tiny_llama) as a, Checkpoint.open(out) as b:
        assert all(a.read_raw(k) == b.read_raw(k) for k in a.keys())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "o2", [TensorSpec("a", "F32", (4,)), TensorSpec("b", "F32", (4,))]) as w:
            w.write("a", torch.ones(4))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_single_file_output(tiny_llama, tmp_path):
    out = tmp_path / "weights.safetensors"
    report = convert_checkpoint(tiny_llama, out)
    assert report.shards == ["weights.safetensors"] and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]
    with Checkpoint.open(tiny_llama) as a, Checkpoint.open(out) as b:
        assert all(a.read_raw(k) == b.read_raw(k) for k in a.keys())
        assert b.metadata["surgeon_command"] == "convert"
