"""Issue 15: side outputs on a full disk (a real 8 KiB tmpfs): a JSON report, an --html page, --plot
figures and SVD cache entries are one `Error:` line each (the cache's used to be a safetensors
traceback), with no temporary file left behind."""

from __future__ import annotations

import pytest

from _hostile_helpers import inputs_of, invoke, one_line, tmpfs, world  # noqa: F401


@pytest.mark.parametrize("args,fragment", [
    (["spectrum", "{base}", "--full", "-o", "{disk}/s.json"], "the disk is full"),
    (["intruders", "{merged}", "--base", "{base}", "--html", "{disk}/r.html"], "the disk is full"),
    (["intruders", "{merged}", "--base", "{base}", "--no-cache", "--plot", "{disk}/figs"], "the disk is full"),
    (["intruders", "{merged}", "--base", "{base}", "--cache", "{disk}/cache"],
     "cannot write to the SVD cache (Error while serializing: I/O error: No space left on device"),
])
def test_side_output_on_a_full_disk_is_one_line(world, args, fragment):  # noqa: F811
    if "--html" in args or "--plot" in args:
        pytest.importorskip("matplotlib")
    before = inputs_of(world)
    with tmpfs("8k") as disk:
        paths = {"base": world["base"], "merged": world["merged"], "disk": disk}
        one_line(invoke(*[a.format(**paths) for a in args]), 1, fragment)
        files = sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if p.is_file())
        assert files == [], files
    assert inputs_of(world) == before
