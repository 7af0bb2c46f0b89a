"""Every malformed input gets one clear line, exit code 1, no traceback, nothing written."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from surgeon.cli.main import cli


def raw_safetensors(path: Path, header: dict | str | bytes, data: bytes = b"", *, length: int | None = None) -> Path:
    """Write a hand-made safetensors file: 8-byte length, header, data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    prefix = struct.pack("<Q", len(header) if length is None else length)
    path.write_bytes(prefix + header + data)
    return path


def run_convert(src: Path, tmp_path: Path) -> tuple[int, str, Path]:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out)])
    return result.exit_code, result.output, out


def assert_refused(src: Path, tmp_path: Path, message: str) -> None:
    code, output, out = run_convert(src, tmp_path)
    assert code == 1, output
    lines = output.strip().splitlines()
    assert lines == [f"Error: {message}"], output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "surgeon-staging" in p.name]


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def test_empty_file(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"")
    assert_refused(f, tmp_path, f"{f}: file is empty (0 bytes); the download or write did not finish. Download it again.")


def test_header_length_larger_than_file(tmp_path):
    f = raw_safetensors(tmp_path / "m.safetensors", {"w": F32_2x2}, b"\0" * 16, length=10_000)
    size = f.stat().st_size
    assert_refused(f, tmp_path, f"{f}: header length prefix says 10000 bytes but the file has only {size - 8} bytes after it; "
                   "the file is truncated or not safetensors. Download it again.")


@pytest.mark.parametrize("content,kind", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "a Git LFS pointer file"),
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", "an HTML page"),
])
def test_incomplete_download(tmp_path, content, kind):
    f = tmp_path / "model.safetensors"
    f.write_bytes(content)
    assert_refused(f, tmp_path, f"{f}: this is {kind}, not safetensors data; it looks like an incomplete download. "
                   "Download the real file again (for LFS: `git lfs pull`, or use huggingface_hub).")


def test_truncated_data(tmp_path):
    f = raw_safetensors(tmp_path / "m.safetensors", {"w": F32_2x2}, b"\0" * 10)
    assert_refused(f, tmp_path, f"{f}: header describes 16 bytes of tensor data but the file holds 10; "
                   "the file is truncated. Download it again.")


def test_trailing_bytes(tmp_path):
    f = raw_safetensors(tmp_path / "m.safetensors", {"w": F32_2x2}, b"\0" * 20)
    assert_refused(f, tmp_path, f"{f}: 4 trailing bytes after the last tensor; the file is corrupt or was appended to. "
                   "Re-export or download it again.")


def test_unknown_dtype(tmp_path):
    f = raw_safetensors(tmp_path / "m.safetensors", {"w": {"dtype": "F12", "shape": [2], "data_offsets": [0, 3]}}, b"\0" * 3)
    code, output, out = run_convert(f, tmp_path)
    assert code == 1 and output.startswith(f"Error: {f}: tensor 'w' has unknown dtype 'F12'; surgeon reads BOOL, U8,")
    assert output.strip().endswith("Convert the checkpoint with a newer safetensors first.")
    assert not out.exists()


def test_overlapping_offsets(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    f = raw_safetensors(tmp_path / "m.safetensors", header, b"\0" * 12)
    assert_refused(f, tmp_path, f"{f}: tensor 'b' (bytes 4..12) overlaps the tensor before it; the file is corrupt. Re-export it.")


def test_shape_does_not_match_byte_span(tmp_path):
    f = raw_safetensors(tmp_path / "m.safetensors", {"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, b"\0" * 16)
    assert_refused(f, tmp_path, f"{f}: tensor 'w' is F32[3, 2] = 24 bytes but its byte span is 16 bytes; "
                   "the file is corrupt. Re-export it.")


def test_duplicate_tensor_names(tmp_path):
    header = '{"w": {"dtype":"F32","shape":[2],"data_offsets":[0,8]}, "w": {"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
    f = raw_safetensors(tmp_path / "m.safetensors", header, b"\0" * 16)
    assert_refused(f, tmp_path, f"{f}: tensor name 'w' appears twice in the header (safetensors would silently keep the last one); "
                   "the file is corrupt. Re-export it.")


def _sharded(folder: Path, weight_map: dict[str, str]) -> Path:
    folder.mkdir()
    save_file({"a": torch.ones(2)}, folder / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(2)}, folder / "model-00002-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("shard", ["../x.safetensors", "/etc/passwd"])
def test_index_points_outside_folder(tmp_path, shard):
    folder = _sharded(tmp_path / "m", {"a": "model-00001-of-00002.safetensors", "b": shard})
    assert_refused(folder, tmp_path, f"{folder / 'model.safetensors.index.json'}: weight_map points 'b' to {shard!r}, "
                   "outside the checkpoint folder; refusing to read it. Fix the index to name shards inside the folder.")


def test_index_missing_shard(tmp_path):
    folder = _sharded(tmp_path / "m", {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert_refused(folder, tmp_path, f"{folder / 'model.safetensors.index.json'}: shard 'model-00002-of-00002.safetensors' "
                   "(holding 'b') is missing; download it again.")


def test_key_in_two_shards(tmp_path):
    folder = _sharded(tmp_path / "m", {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, folder / "model-00002-of-00002.safetensors")
    assert_refused(folder, tmp_path, f"{folder}: tensor 'a' is stored in two shards (model-00001-of-00002.safetensors and "
                   "model-00002-of-00002.safetensors); the checkpoint is inconsistent. Re-export it.")


def test_stale_index_next_to_single_file(tmp_path):
    folder = _sharded(tmp_path / "m", {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, folder / "model.safetensors")
    assert_refused(folder, tmp_path, f"{folder}: holds both model.safetensors and model.safetensors.index.json; one of them is stale. "
                   "Delete the index if model.safetensors is the whole model, or delete model.safetensors if the shards are.")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_weights_refused(tmp_path, name):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / name).write_bytes(b"\x80\x04not really a pickle")
    expected_path = folder / name
    msg = (f"{expected_path}: pickle weights are refused: loading them can run arbitrary code, and surgeon never unpickles. "
           "Convert them to safetensors first (e.g. transformers' save_pretrained(..., safe_serialization=True)) "
           "or download the repo's .safetensors files.")
    assert_refused(folder, tmp_path, msg)
    assert_refused(expected_path, tmp_path, msg)


def test_path_does_not_exist(tmp_path):
    missing = tmp_path / "nope"
    assert_refused(missing, tmp_path, f"{missing}: no such file or folder; check the path.")


def test_output_on_input(tiny_llama):
    for out in (tiny_llama, tiny_llama / "sub"):
        before = sorted((p.name, p.stat().st_mtime_ns) for p in tiny_llama.iterdir())
        result = CliRunner().invoke(cli, ["convert", str(tiny_llama), "-o", str(out)])
        assert result.exit_code == 1
        assert result.output == (f"Error: {out}: the output overlaps the input {tiny_llama}; surgeon never writes over its inputs. "
                                 "Choose another output folder.\n")
        assert sorted((p.name, p.stat().st_mtime_ns) for p in tiny_llama.iterdir()) == before


def test_non_empty_output_needs_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = CliRunner().invoke(cli, ["convert", str(tiny_llama), "-o", str(out)])
    assert result.exit_code == 1
    assert result.output == f"Error: {out}: output folder is not empty; choose another or pass --overwrite to replace it.\n"
    assert (out / "keep.txt").read_text() == "x"
    result = CliRunner().invoke(cli, ["convert", str(tiny_llama), "-o", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_debug_shows_traceback(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"")
    result = CliRunner().invoke(cli, ["--debug", "convert", str(f), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "CheckpointFormatError"


def test_truncated_under_us_raises(tmp_path):
    """A file that shrinks after its header was validated gives an error, not a crash."""
    from surgeon.errors import CheckpointFormatError
    from surgeon.io import Checkpoint

    f = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, f)
    with Checkpoint.open(f) as ckpt:
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size - 100)
        with pytest.raises(CheckpointFormatError, match="truncated or is still being written"):
            ckpt.get("w")
