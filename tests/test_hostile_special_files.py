"""Issue 15: a FIFO, /dev/zero, a socket or a folder where a data file, a JSON config or a file of a model
folder belongs: one `Error:` line naming it, at once (a FIFO would otherwise block forever), nothing
written, inputs untouched. Run as subprocesses with a timeout, so that a hang fails the test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from _finetune_helpers import build_model, sentiment_rows, write_jsonl
from _hostile_helpers import digest, env, run_cli, surgeon_argv

TIMEOUT = 120


@pytest.fixture(scope="module")
def sf(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("special")
    p = {"root": root, "cls": build_model("bert-cls", root / "cls"), "bert": build_model("bert", root / "bert"),
         "train": write_jsonl(root / "train.jsonl", sentiment_rows(8, 0))}
    p["fifo"] = root / "fifo.jsonl"
    os.mkfifo(p["fifo"])
    p["folder"] = root / "folder.jsonl"
    p["folder"].mkdir()
    p["socket"] = root / "sock.jsonl"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(p["socket"]))
    sock.close()  # the socket file stays
    return p


def failed_with(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize("kind,what", [("fifo", "a FIFO (named pipe)"), ("socket", "a socket"), ("zero", "a device")])
def test_eval_data_that_is_not_a_regular_file(sf, kind, what):
    data = Path("/dev/zero") if kind == "zero" else sf[kind]
    before = digest(sf["cls"])
    done = run_cli("eval", sf["cls"], "--data", data, "--task", "classification", timeout=TIMEOUT)
    failed_with(done, f"{data}: is {what}, not a regular file; give the data file as a regular file")
    assert digest(sf["cls"]) == before


@pytest.mark.parametrize("option", ["--data", "--eval"])
def test_finetune_data_fifo_writes_nothing(sf, option):
    out = sf["root"] / f"out{option}"
    args = ["--data", sf["fifo"]] if option == "--data" else ["--data", sf["train"], "--eval", sf["fifo"]]
    done = run_cli("finetune", sf["bert"], *args, "--method", "lora", "-o", out, timeout=TIMEOUT)
    failed_with(done, f"{sf['fifo']}: is a FIFO (named pipe), not a regular file")
    assert not out.exists() and not [p for p in sf["root"].iterdir() if ".surgeon-" in p.name]


def test_eval_data_folder_is_named(sf):
    failed_with(run_cli("eval", sf["cls"], "--data", sf["folder"], "--task", "classification", timeout=TIMEOUT),
                f"{sf['folder']}: is a folder; give a .jsonl or .csv file.")


def _replaced(src: Path, dst: Path, name: str, make: str) -> Path:
    shutil.copytree(src, dst)
    (dst / name).unlink(missing_ok=True)
    if make == "fifo":
        os.mkfifo(dst / name)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(dst / name))
        sock.close()
    return dst


def test_fifo_configs_of_models_and_adapters(sf, tmp_path, world_adapter):
    base, adapter = world_adapter
    bad_adapter = _replaced(adapter, tmp_path / "adapter", "adapter_config.json", "fifo")
    bad_base = _replaced(base, tmp_path / "base", "config.json", "fifo")
    with_socket = _replaced(base, tmp_path / "base-sock", "notes.txt", "socket")
    before = digest(base, adapter)
    failed_with(run_cli("merge", base, bad_adapter, "-o", tmp_path / "m1", timeout=TIMEOUT),
                f"{bad_adapter / 'adapter_config.json'}: is a FIFO (named pipe)", "give the adapter config")
    failed_with(run_cli("merge", bad_base, adapter, "-o", tmp_path / "m2", timeout=TIMEOUT),
                f"{bad_base / 'config.json'}: is a FIFO (named pipe)", "give config.json as a regular file")
    failed_with(run_cli("convert", with_socket, "--dtype", "fp16", "-o", tmp_path / "c", timeout=TIMEOUT),
                f"{with_socket / 'notes.txt'}: is a socket", "model folder's file")
    assert not any((tmp_path / n).exists() for n in ("m1", "m2", "c")) and digest(base, adapter) == before


def test_push_refuses_a_fifo_it_would_leave_out(sf, tmp_path):
    folder = tmp_path / "pub"
    shutil.copytree(sf["cls"], folder)
    os.mkfifo(folder / "notes.txt")
    environment = {k: v for k, v in env().items() if k != "HF_HUB_OFFLINE"}
    environment.update(HF_TOKEN="hf_x", HF_ENDPOINT="http://127.0.0.1:9")  # checked before any network
    done = subprocess.run(surgeon_argv("push", folder, "me/model"), capture_output=True, text=True, env=environment,
                          timeout=TIMEOUT)
    failed_with(done, f"{folder / 'notes.txt'}: is a FIFO (named pipe)", "file to push")


@pytest.fixture(scope="module")
def world_adapter(tiny_llama: Path, tmp_path_factory) -> tuple[Path, Path]:
    from _diff_helpers import make_lora_adapter

    root = tmp_path_factory.mktemp("special-adapter")
    base = root / "base"
    shutil.copytree(tiny_llama, base)
    return base, make_lora_adapter(base, root / "adapter")
