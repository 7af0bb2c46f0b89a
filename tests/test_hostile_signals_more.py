"""Issue 15, signals for the writers test_hostile_signals does not cover: `combine`, `diff -o`,
`spectrum -o` (a checkpoint of singular values, or a JSON report) and the `--html` page of
`intruders`. A real SIGTERM or SIGHUP at a known point (tests/_hostile_child.py) leaves nothing beside
the target -- no staging folder, no temporary side file, no lock, no parent folder -- and the inputs
untouched."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _hostile_helpers import default_signals, env, inputs_of, world  # noqa: F401

CHILD = Path(__file__).with_name("_hostile_child.py")


def command(name: str, w: dict[str, Path], out: Path) -> list[object]:
    return {
        "combine": ["combine", w["adapter"], f"{w['adapter']}:0.5", "-o", out],
        "combine-ties": ["combine", w["adapter"], w["adapter"], "--method", "ties_svd", "--density", "0.5", "-o", out],
        "diff": ["diff", w["merged"], w["base"], "-o", out],
        "spectrum": ["spectrum", w["base"], "--full", "-o", f"{out}.safetensors"],
    }[name]


def interrupt(point: str, args: list[object], sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, str(CHILD), point, *(str(a) for a in args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(),
                            preexec_fn=default_signals)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if line.strip() != f"AT {point}":
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child never reached {point}: {line}{out}{err}")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def assert_clean(code: int, err: str, sig: int, folder: Path) -> None:
    assert code == 128 + sig, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"Interrupted by {signal.Signals(sig).name}; nothing partial was left."
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("point", ["write", "staged"])
@pytest.mark.parametrize("name", ["combine", "combine-ties", "diff", "spectrum"])
def test_signal_leaves_nothing_beside_the_target(world, tmp_path, name, point, sig):  # noqa: F811
    before = inputs_of(world)
    code, err = interrupt(point, command(name, world, tmp_path / "new" / "out"), sig)
    assert_clean(code, err, sig, tmp_path)
    assert inputs_of(world) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("name", ["diff", "combine"])
def test_signal_while_the_lock_is_taken_leaves_no_lock_file(world, tmp_path, name, sig):  # noqa: F811
    # The signal comes after the lock file is made and locked but before it is recorded as held (a
    # `--nproc` parent forwarding SIGTERM hit that window): it waits, then the run cleans up as anywhere.
    before = inputs_of(world)
    code, err = interrupt("lock", command(name, world, tmp_path / "new" / "out"), sig)
    assert_clean(code, err, sig, tmp_path)
    assert inputs_of(world) == before


@pytest.mark.parametrize("args", [["spectrum", "{base}", "-o", "{out}/new/s.json"],
                                  ["intruders", "{merged}", "--base", "{base}", "--html", "{out}/r.html"],
                                  ["spectrum", "{base}", "--html", "{out}/s.html"]])
def test_signal_while_a_side_output_is_written_leaves_no_temporary(world, tmp_path, args):  # noqa: F811
    pytest.importorskip("matplotlib")
    before = inputs_of(world)
    paths = {"base": world["base"], "merged": world["merged"], "out": tmp_path}
    code, err = interrupt("side", [a.format(**paths) for a in args])
    assert_clean(code, err, signal.SIGTERM, tmp_path)
    assert inputs_of(world) == before


def test_sigkill_while_a_side_output_is_written_is_cleaned_by_the_next_run(world, tmp_path):  # noqa: F811
    target = tmp_path / "s.json"
    proc = subprocess.Popen([sys.executable, str(CHILD), "side", "spectrum", str(world["base"]), "-o", str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            preexec_fn=default_signals)
    assert proc.stdout.readline().strip() == "AT side"  # type: ignore[union-attr]
    proc.kill()
    proc.communicate(timeout=60)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".s.json.surgeon-staging-") and not target.exists()
    done = subprocess.run([sys.executable, "-m", "surgeon", "spectrum", str(world["base"]), "-o", str(target)],
                          capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_sighup_under_nohup_is_left_ignored():
    # `nohup surgeon merge ... &` then logging out must not stop the run: surgeon turns SIGHUP/SIGTERM into a
    # clean interrupt only where the signal still has its default action, and leaves SIG_IGN as it is.
    probe = (
        "import os, signal\n"
        "from surgeon.io.signals import signals_as_interrupts\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "with signals_as_interrupts():\n"
        "    os.kill(os.getpid(), signal.SIGHUP)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('unreachable')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env(), timeout=120,
                          preexec_fn=default_signals)
    # SIGHUP was ignored (no Interrupted for it), the SIGTERM that follows is the clean interrupt
    assert done.returncode == 1 and "Interrupted: SIGTERM" in done.stderr, done.stderr
    assert "unreachable" not in done.stdout
