"""Issue 15: `surgeon demo -o DIR` fills DIR step by step for minutes, so DIR follows the output rules in
its own way: one run per folder (a second fails at once naming the first), never a file, and
--overwrite replaces only a folder an earlier demo wrote -- `demo -o ~ --overwrite` can never empty a
home folder."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from click.testing import CliRunner

from _hostile_helpers import digest, env, leftovers
from surgeon.cli.main import cli
from surgeon.io.output import claim_work_folder, output_guard


def demo(*args: object):
    return CliRunner().invoke(cli, ["demo", *(str(a) for a in args)])


def test_overwrite_never_empties_a_folder_no_demo_wrote(tmp_path):
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    (home / "notes.txt").write_text("mine\n")
    before = digest(home)
    for continual in ([], ["--continual"]):
        result = demo("-o", home, "--overwrite", *continual)
        assert result.exit_code == 1, result.output
        assert result.output == (f"Error: {home.resolve()}: holds files no earlier run wrote (none of continual.json, "
                                 "demo.json, models); --overwrite replaces only a demo folder surgeon wrote: choose a "
                                 "new -o folder or empty this one yourself.\n")
    assert digest(home) == before and leftovers(tmp_path) == []


def test_overwrite_replaces_an_earlier_demo_folder(tmp_path):
    for marker in ("demo.json", "continual.json", "models"):
        old = tmp_path / f"old-{marker}"
        old.mkdir()
        (old / marker).mkdir() if marker == "models" else (old / marker).write_text("{}")
        (old / "report.html").write_text("old page")
        with output_guard():
            claim_work_folder(old, overwrite=True, owned=("continual.json", "demo.json", "models"), what="demo folder")
            assert sorted(p.name for p in tmp_path.iterdir() if ".surgeon-lock" in p.name) == [f".{old.name}.surgeon-lock"]
        assert old.is_dir() and list(old.iterdir()) == []
    assert leftovers(tmp_path) == []  # the lock file went with the run


def test_a_second_demo_into_the_same_folder_fails_at_once(tmp_path):
    out = tmp_path / "demo"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from surgeon.io.locks import acquire_lock
        acquire_lock(Path({str(out)!r}))
        print("locked", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = demo("-o", out)
        assert result.exit_code == 1, result.output
        assert result.output.startswith(f"Error: {out}: another surgeon run (") and f"pid {holder.pid}" in result.output
        assert not out.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_file_as_the_demo_folder(tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("mine\n")
    result = demo("-o", target, "--overwrite")
    assert result.exit_code == 1 and result.output == (f"Error: {target.resolve()}: exists and is not a folder; "
                                                       "choose another -o folder.\n")
    assert target.read_text() == "mine\n"
