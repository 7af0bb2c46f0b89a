"""`surgeon convert --dry-run`: the plan is data made before anything runs, the dry run writes nothing,
and the real run does exactly what the plan said (checked on the written files, against torch's own
casts and the input bytes, not against the plan's code)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from surgeon.cli.main import cli
from surgeon.errors import CheckpointFormatError
from surgeon.workflows.convert import execute_convert, plan_convert

# st dtype -> torch dtype, written out here (not taken from surgeon)
TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """fp32 and bf16 weights, an int64 buffer, a config and a tokenizer file."""
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "src"
    src.mkdir()
    save_file({"a.weight": torch.randn(64, 32, generator=g),  # 8 KiB
               "b.weight": torch.randn(32, 32, generator=g).to(torch.bfloat16),  # 2 KiB
               "b.bias": torch.randn(32, generator=g),
               "position_ids": torch.arange(16, dtype=torch.int64)[None],
               "c.weight": torch.randn(48, 32, generator=g)},  # 6 KiB
              str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "toy", "dtype": "float32"}))
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    return src


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _tree(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def _written(out: Path) -> dict[str, tuple[str, torch.Tensor, bytes]]:
    """name -> (shard file, tensor, raw bytes) as read back from the output with safetensors."""
    found = {}
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                found[name] = (path.name, t, t.contiguous().view(torch.uint8).numpy().tobytes())
    return found


def test_dry_run_writes_nothing_and_lists_every_tensor(mixed: Path, tmp_path: Path):
    before = _tree(tmp_path)
    out = tmp_path / "deep" / "out"
    text = _invoke("convert", str(mixed), "-o", str(out), "--dtype", "bf16", "--max-shard-size", "9KB", "--dry-run")
    assert _tree(tmp_path) == before  # not the output, not its parent, no lock or staging folder
    lines = {line.split()[0]: line for line in text.splitlines()[2:-1]}
    assert set(lines) == {"a.weight", "b.weight", "b.bias", "position_ids", "c.weight"}
    assert "cast from F32 to BF16" in lines["a.weight"] and "copied byte for byte" in lines["b.weight"]
    assert "copied byte for byte" in lines["position_ids"]
    assert text.splitlines()[-1].startswith(f"dry run: {out} would get 5 tensors (2 copied byte for byte, 3 cast)")
    assert text.splitlines()[-1].endswith("config.json (rewritten: dtype BF16). Nothing was written.")


@pytest.mark.parametrize(("dtype", "shard_size"), [("bf16", "9KB"), ("auto", "5GB"), ("fp16", "3KB")])
def test_the_real_run_does_what_the_dry_run_planned(mixed: Path, tmp_path: Path, dtype: str, shard_size: str):
    out = tmp_path / "out"
    args = ["convert", str(mixed), "-o", str(out), "--dtype", dtype, "--max-shard-size", shard_size]
    plan = json.loads(_invoke(*args, "--dry-run", "--json"))
    assert plan["dry_run"] is True and not out.exists()
    report = json.loads(_invoke(*args, "--json"))
    written = _written(out)
    with safe_open(str(mixed / "model.safetensors"), "pt") as f:
        source = {name: f.get_tensor(name) for name in f.keys()}

    assert sorted(s["name"] for s in plan["steps"]) == sorted(source)  # every tensor, once
    assert sorted(written) == sorted(source)
    assert plan["shards"] == report["shards"] == sorted({shard for shard, _, _ in written.values()})
    for step in plan["steps"]:
        shard, tensor, raw = written[step["name"]]
        original = source[step["name"]]
        assert shard == step["shard"]
        assert tensor.dtype == TORCH[step["out_dtype"]] and list(tensor.shape) == step["shape"]
        assert len(raw) == step["nbytes"]
        if step["action"] == "copy":
            assert raw == original.contiguous().view(torch.uint8).numpy().tobytes()
        else:
            assert step["what"] == f"cast from {step['dtype']} to {step['out_dtype']}"
            assert torch.equal(tensor, original.to(TORCH[step["out_dtype"]]))  # one rounding, as torch casts
    for key in ("tensors", "copied", "cast", "bytes_written"):
        assert plan[key] == report[key]
    assert report["bytes_written"] == sum(len(raw) for _, _, raw in written.values())

    side = sorted(p.name for p in out.iterdir() if not p.name.endswith((".safetensors", ".index.json")))
    assert side == sorted(plan["copied_files"] + plan["rewritten_files"] + ["surgeon_provenance.json"])
    assert (out / "tokenizer.json").read_bytes() == (mixed / "tokenizer.json").read_bytes()
    names = {"auto": "float32", "bf16": "bfloat16", "fp16": "float16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == names[dtype]
    assert ("config.json" in plan["rewritten_files"]) == (dtype != "auto")


def test_execution_follows_the_plan_it_is_given(mixed: Path, tmp_path: Path):
    plan = plan_convert(mixed, tmp_path / "out", dtype="bf16")
    # keep c.weight in float32 after all: the executor must copy it, not re-decide from --dtype
    steps = tuple(dataclasses.replace(s, action="copy", out_dtype=s.dtype, nbytes=s.nbytes * 2)
                  if s.name == "c.weight" else s for s in plan.steps)
    report = execute_convert(dataclasses.replace(plan, steps=steps))
    written = _written(tmp_path / "out")
    assert written["c.weight"][1].dtype == torch.float32 and written["a.weight"][1].dtype == torch.bfloat16
    assert (report.copied, report.cast) == (3, 2)


def test_a_source_changed_since_the_plan_is_refused(mixed: Path, tmp_path: Path):
    plan = plan_convert(mixed, tmp_path / "out", dtype="bf16")
    save_file({"a.weight": torch.zeros(64, 16)}, str(mixed / "model.safetensors"))
    os.utime(mixed / "model.safetensors")
    with pytest.raises(CheckpointFormatError) as err:
        execute_convert(plan)
    assert str(err.value) == (f"{mixed}: tensor 'a.weight' is F32 [64, 16] now but was F32 [64, 32] when the "
                              "conversion was planned; the source changed. Plan the conversion again.")
    assert not (tmp_path / "out").exists()


def test_a_bad_dtype_or_shard_size_is_refused_by_the_dry_run_too(mixed: Path, tmp_path: Path):
    for extra, message in ((["--dtype", "int8"], "--dtype 'int8' is not a float dtype surgeon writes"),
                           (["--max-shard-size", "lots"], "shard size 'lots' is not a size")):
        result = CliRunner().invoke(cli, ["convert", str(mixed), "-o", str(tmp_path / "o"), "--dry-run", *extra])
        assert result.exit_code == 1 and result.output.startswith(f"Error: {message}"), result.output
