"""Issue 15: an output path that names a device, FIFO or socket (directly or through a symlink) is
refused even with --overwrite -- `--html /dev/null --overwrite` used to replace /dev/null with a
regular file -- for checkpoints and side outputs alike, before any work."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from _hostile_helpers import inputs_of, invoke, leftovers, one_line, world  # noqa: F401


def special(folder: Path, name: str, kind: str) -> Path:
    path = folder / name
    if kind == "device":
        if os.geteuid() != 0:
            pytest.skip("mknod of a character device needs root")
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    else:
        os.mkfifo(path)
    return path


def still_special(path: Path, kind: str) -> bool:
    mode = os.stat(path).st_mode
    return stat.S_ISCHR(mode) if kind == "device" else stat.S_ISFIFO(mode)


@pytest.mark.parametrize("kind,what", [("device", "a device"), ("fifo", "a FIFO (named pipe)")])
@pytest.mark.parametrize("case", ["spectrum-o", "spectrum-html", "intruders-html", "precision-report", "merge-o",
                                  "convert-o", "via-symlink"])
def test_a_special_file_as_output_is_never_replaced(world, tmp_path, kind, what, case):  # noqa: F811
    pytest.importorskip("matplotlib")
    before = inputs_of(world)
    name = {"spectrum-o": "s.json", "precision-report": "p.json", "merge-o": "m.safetensors",
            "convert-o": "c.safetensors"}.get(case, "page.html")
    target = special(tmp_path, name, kind)
    shown = target
    if case == "via-symlink":
        shown = tmp_path / "link.html"
        shown.symlink_to(target)
    out = tmp_path / "merged"
    args = {
        "spectrum-o": ["spectrum", world["base"], "-o", target, "--overwrite"],
        "spectrum-html": ["spectrum", world["base"], "--html", target, "--overwrite"],
        "intruders-html": ["intruders", world["merged"], "--base", world["base"], "--html", target, "--overwrite"],
        "via-symlink": ["intruders", world["merged"], "--base", world["base"], "--html", shown, "--overwrite"],
        "precision-report": ["merge", world["base"], world["adapter"], "-o", out, "--precision-report", target,
                             "--overwrite"],
        "merge-o": ["merge", world["base"], world["adapter"], "-o", target, "--overwrite"],
        "convert-o": ["convert", world["base"], "--dtype", "fp16", "-o", target, "--overwrite"],
    }[case]
    one_line(invoke(*args), 1, f"{shown}: is {what}, not a file or folder; surgeon never replaces one")
    assert still_special(target, kind) and not out.exists() and leftovers(tmp_path) == []
    assert inputs_of(world) == before
