"""Class 3 of issue 15: a read-only or full disk, a FIFO or a device given as weights: one `Error:` line
naming the file and the fix (on a full disk: the bytes needed and free, checked before writing), no
traceback, inputs unchanged, nothing left behind. Real tmpfs mounts (root), else skipped."""

from __future__ import annotations

import os
import re

import pytest
import torch

from _hostile_helpers import inputs_of, invoke, leftovers, one_line, tmpfs, world  # noqa: F401
from surgeon.errors import OutputError
from surgeon.io.writer import CheckpointWriter, TensorSpec


def _writers(w, out):
    return {
        "merge": ["merge", w["base"], w["adapter"], "-o", out],
        "diff": ["diff", w["merged"], w["base"], "-o", out],
        "convert": ["convert", w["base"], "-o", out],
        "scale-intruders": ["scale-intruders", w["merged"], "--base", w["base"], "--lambda", "0.5", "-o", out],
    }


@pytest.mark.parametrize("name", ["merge", "diff", "convert", "scale-intruders"])
def test_read_only_output_disk(world, name):  # noqa: F811
    before = inputs_of(world)
    with tmpfs("1m", read_only=True) as ro:
        one_line(invoke(*_writers(world, ro / "out")[name]), 1,
                 f"{ro / 'out'}: the file system is read-only; choose an output on a writable disk.")
        assert os.listdir(ro) == []
    assert inputs_of(world) == before


@pytest.mark.parametrize("name", ["merge", "diff", "convert", "scale-intruders"])
def test_full_output_disk_is_found_before_writing(world, name):  # noqa: F811
    before = inputs_of(world)
    with tmpfs("16k") as small:
        line = one_line(invoke(*_writers(world, small / "out")[name]), 1, f"{small / 'out'}: not enough free space")
        needed, free = map(int, re.search(r"needs (\d+) bytes and (\d+) bytes are free", line).groups())
        st = os.statvfs(small)
        now = st.f_bavail * st.f_frsize  # measured while the lock file (one page) was there
        assert now - st.f_frsize <= free <= now and needed > free
        assert line.endswith("free some space or choose an output on another disk.")
        assert os.listdir(small) == []
    assert inputs_of(world) == before


def test_disk_filling_up_during_the_write(tmp_path):
    """The up-front check passes, then another writer fills the disk: still one line, nothing published."""
    specs = [TensorSpec(f"t{i}", "F32", (64, 256)) for i in range(4)]  # 4 x 64 KiB
    with tmpfs("512k") as disk:
        with pytest.raises(OutputError) as caught:
            with CheckpointWriter(disk / "out", specs) as writer:
                filler = disk / "filler"
                fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # what is left of the disk goes to someone else
                try:
                    while os.write(fd, b"\0" * 4096):
                        pass
                except OSError:
                    pass
                finally:
                    os.close(fd)
                for spec in specs:
                    writer.write(spec.name, torch.ones(spec.shape))
        message = str(caught.value)
        assert message.startswith(f"{disk / 'out'}: the disk is full (the output needs ")
        assert "bytes are free); free some space or choose an output on another disk. Nothing was published." in message
        assert sorted(os.listdir(disk)) == ["filler"]


def test_fifo_and_devices_as_weights(world, tmp_path):  # noqa: F811
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)
    for source in (fifo, "/dev/zero"):
        one_line(invoke("inspect", source), 1,
                 f"{source}: is not a regular file or folder (a FIFO, device or socket); give a .safetensors file "
                 "or a model folder.")
        one_line(invoke("convert", source, "-o", tmp_path / "out"), 1, "is not a regular file or folder")
        one_line(invoke("merge", source, world["adapter"], "-o", tmp_path / "out"), 1, "is not a regular file")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "model.safetensors").symlink_to("/dev/zero")
    one_line(invoke("convert", linked, "-o", tmp_path / "out"), 1, f"{linked}: no .safetensors weights")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
