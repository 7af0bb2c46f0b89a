"""The shared writer's opening on rank 0: a signal at any point of it leaves no staging folder and no lock."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from surgeon.errors import OutputError
from surgeon.io.layout import TensorSpec
from surgeon.io.output import output_guard
from surgeon.io.signals import Interrupted
from surgeon.io.writer import CheckpointWriter
from surgeon.parallel.exchange import Share
from surgeon.parallel.world import SOLO
from surgeon.workflows.shared_write import write_shared

SPECS = [TensorSpec("a", "F32", (4, 4)), TensorSpec("b", "F32", (8,))]


def _run(tmp_path, fill=None):
    out = tmp_path / "parent" / "out"

    def open_writer():
        return CheckpointWriter(out, SPECS)

    def default_fill(shards):
        shards.write("a", torch.ones(4, 4))
        shards.write("b", torch.arange(8, dtype=torch.float32))

    with output_guard():
        write_shared(SOLO, Share(SOLO, []), open_writer=open_writer, fill=fill or default_fill,
                     finish=lambda writer, got: None, encode=lambda r: r, decode=lambda r: r)
    return out


def _entries(tmp_path):
    return sorted(p.name for p in (tmp_path / "parent").iterdir()) if (tmp_path / "parent").exists() else []


def test_the_shared_writer_publishes(tmp_path):
    from safetensors.torch import load_file

    out = _run(tmp_path)
    got = load_file(out / "model.safetensors")
    assert torch.equal(got["a"], torch.ones(4, 4)) and torch.equal(got["b"], torch.arange(8.0))
    assert _entries(tmp_path) == ["out"]


@pytest.mark.parametrize("stage", ["after the staging folder", "after the first shard header"])
def test_a_signal_while_rank_0_shares_the_staging_folder_removes_it(tmp_path, monkeypatch, stage):
    """The window CI hit: SIGTERM from the launcher after the lock, while ``share()`` created the files."""
    import surgeon.io.writer as writer_module

    real_pwrite = writer_module.pwrite_all

    def header_then_signal(fd, data, offset):
        real_pwrite(fd, data, offset)
        os.kill(os.getpid(), signal.SIGTERM)  # the guard's handler raises Interrupted here

    real_mkdir = type(tmp_path).mkdir

    def mkdir_then_signal(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if ".surgeon-staging-" in self.name:
            os.kill(os.getpid(), signal.SIGTERM)

    if stage == "after the staging folder":
        monkeypatch.setattr(type(tmp_path), "mkdir", mkdir_then_signal)
    else:
        monkeypatch.setattr(writer_module, "pwrite_all", header_then_signal)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Interrupted):
            _run(tmp_path)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert _entries(tmp_path) == []  # no staging, no lock; the parent the writer created is gone too


def test_a_failure_while_rank_0_shares_is_the_error_and_leaves_nothing(tmp_path, monkeypatch):
    def no_space(self):
        real_mkdir = type(self.staging).mkdir
        real_mkdir(self.staging)
        raise OutputError(f"{self.out}: the disk is full (test).")

    monkeypatch.setattr(CheckpointWriter, "share", no_space)
    with pytest.raises(OutputError, match="disk is full"):
        _run(tmp_path)
    assert _entries(tmp_path) == []
