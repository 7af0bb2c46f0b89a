"""Issue 15, `--nproc N` runs: SIGTERM or SIGHUP to the parent while its ranks work is one line and exit
128+n like a one-process run (torch's launcher used to end it with a SignalException traceback); the
ranks are stopped, nothing is left beside the target, the inputs are untouched. Bad input on a process
group is one line too."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from _hostile_helpers import default_signals, env, inputs_of, invoke, leftovers, one_line, surgeon_argv, world  # noqa: F401


def _wait_for(path: Path, proc: subprocess.Popen[str], limit: float = 120.0) -> None:
    end = time.monotonic() + limit
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            out, err = proc.communicate()
            pytest.fail(f"the ranks never took the lock {path}: {out}{err}")
        time.sleep(0.005)


def _ranks_alive(marker: str) -> list[int]:
    alive = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and "pytest" not in cmdline:
                alive.append(int(pid))
    return alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("name", ["scale-intruders", "merge"])
def test_signal_to_the_nproc_parent_is_one_line(world, tmp_path, name, sig):  # noqa: F811
    before = inputs_of(world)
    out = tmp_path / "new" / "out"
    args = {"scale-intruders": ["scale-intruders", world["merged"], "--base", world["base"], "--lambda", "0",
                                "--no-cache"],
            "merge": ["merge", world["base"], world["adapter"]]}[name]
    proc = subprocess.Popen(surgeon_argv(*args, "-o", out, "--nproc", "2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(),
                            preexec_fn=default_signals)
    _wait_for(tmp_path / "new" / ".out.surgeon-lock", proc)  # rank 0 holds the target: the group is at work
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "SignalException" not in err, err
    assert err.strip().splitlines() == [f"Interrupted by {signal.Signals(sig).name}; nothing partial was left."]
    time.sleep(0.5)
    assert _ranks_alive(str(out)) == []
    assert not (tmp_path / "new").exists() or leftovers(tmp_path / "new") == [], leftovers(tmp_path / "new")
    if out.exists():  # the ranks had published before the signal came: then the output is complete
        assert invoke("inspect", out).exit_code == 0
    assert inputs_of(world) == before


@pytest.mark.parametrize("args,fragment", [
    (["merge", "{base}", "{tmp}/missing", "-o", "{tmp}/m"], "missing: no such file or folder"),
    (["diff", "{merged}", "{adapter}", "-o", "{tmp}/d"], "is a PEFT adapter, not a model"),
    (["intruders", "{tmp}/missing", "--base", "{base}"], "missing: no such file or folder"),
    (["scale-intruders", "{merged}", "--base", "{base}", "--lambda", "nan", "-o", "{tmp}/s"], "--lambda nan"),
])
def test_bad_input_on_a_process_group_is_one_line(world, tmp_path, args, fragment):  # noqa: F811
    paths = {"base": world["base"], "merged": world["merged"], "adapter": world["adapter"], "tmp": tmp_path}
    done = subprocess.run(surgeon_argv(*[a.format(**paths) for a in args], "--nproc", "2"), capture_output=True,
                          text=True, env=env(), timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], done.stderr
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("delay", [0.02, 0.1, 0.3])
def test_a_signal_later_in_an_nproc_merge_leaves_nothing_partial(world, tmp_path, delay):  # noqa: F811
    """The signal at other moments than the lock's (the staging folder, the shards, the publish, the exit):
    no staging, scratch or lock stays, and a target that exists is complete."""
    out = tmp_path / "new" / "out"
    proc = subprocess.Popen(surgeon_argv("merge", world["base"], world["adapter"], "-o", out, "--nproc", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            preexec_fn=default_signals)
    _wait_for(tmp_path / "new" / ".out.surgeon-lock", proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # 143 with the one line; 0 if it had finished; -15 if it came after the command published (the guard gone)
    assert proc.returncode in (0, 128 + signal.SIGTERM, -signal.SIGTERM), err
    assert "Traceback" not in err and "SignalException" not in err, err
    time.sleep(0.5)
    assert _ranks_alive(str(out)) == []
    assert not (tmp_path / "new").exists() or leftovers(tmp_path / "new") == [], leftovers(tmp_path / "new")
    if out.exists():
        assert invoke("inspect", out).exit_code == 0
