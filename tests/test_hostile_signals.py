"""Classes 5 and 6 of issue 15: real signals sent to real `surgeon` processes at known points.

SIGTERM and SIGHUP clean up like Ctrl-C: nothing beside the target (no staging, no scratch, no
lock), no empty parents, inputs untouched; inside the publish step they wait until the output is
complete. After SIGKILL the next run removes what was left (or puts back an old output that a
killed fallback publish had renamed away). A second writer of the same target fails at once,
naming the first one's pid.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _finetune_helpers import build_model, lm_rows, write_jsonl
from _hostile_helpers import default_signals, env, inputs_of, invoke, leftovers, one_line, run_cli, world  # noqa: F401
from surgeon.io.checkpoint import Checkpoint

CHILD = Path(__file__).with_name("_hostile_child.py")


@pytest.fixture(scope="module")
def ftbase(world):  # noqa: F811
    folder = build_model("llama", world["root"] / "ftbase")
    return folder, write_jsonl(world["root"] / "lm.jsonl", lm_rows(8, 0))


def command(name: str, w: dict[str, Path], ft: tuple[Path, Path], out: Path) -> list[object]:
    return {
        "merge": ["merge", w["base"], w["adapter"], "-o", out],
        "convert": ["convert", w["base"], "-o", out, "--dtype", "fp16"],
        "apply": ["apply", w["base"], f"{w['tv']}:0.5", "-o", out],
        "scale-intruders": ["scale-intruders", w["merged"], "--base", w["base"], "--lambda", "0.5", "-o", out],
        "extract-lora": ["extract-lora", w["merged"], w["base"], "-r", "2", "-o", out],
        "finetune": ["finetune", ft[0], "--data", ft[1], "--task", "causal-lm", "--method", "lora", "--epochs", "1",
                     "--batch-size", "8", "-o", out],
    }[name]


def start(point: str, args: list[object]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(CHILD), point, *(str(a) for a in args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(),
                            preexec_fn=default_signals)


def wait_at(proc: subprocess.Popen[str], point: str) -> None:
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if line.strip() != f"AT {point}":
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child never reached {point}: {line}{out}{err}")


def interrupt(point: str, args: list[object], sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc = start(point, args)
    wait_at(proc, point)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


WRITERS = ["merge", "convert", "apply", "scale-intruders", "extract-lora", "finetune"]


@pytest.mark.parametrize("point", ["write", "staged"])  # "open" is the moment of the lock test below
@pytest.mark.parametrize("name", WRITERS)
def test_sigterm_leaves_nothing_beside_the_target(world, ftbase, tmp_path, name, point):  # noqa: F811
    before = inputs_of(world)
    out = tmp_path / "new" / "out"  # the parent does not exist yet: it must not stay behind either
    code, err = interrupt(point, command(name, world, ftbase, out))
    assert code == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "Interrupted by SIGTERM; nothing partial was left."
    assert list(tmp_path.iterdir()) == []
    assert inputs_of(world) == before


def test_sigterm_and_sighup_in_finetune_remove_the_scratch_folder(world, ftbase, tmp_path):  # noqa: F811
    for sig in (signal.SIGTERM, signal.SIGHUP):
        out = tmp_path / "ft"
        code, err = interrupt("scratch", command("finetune", world, ftbase, out), sig)
        assert code == 128 + sig, err
        assert err.strip().splitlines()[-1] == f"Interrupted by {signal.Signals(sig).name}; nothing partial was left."
        assert list(tmp_path.iterdir()) == []


def test_sighup_cleans_up_like_sigterm(world, ftbase, tmp_path):  # noqa: F811
    code, err = interrupt("staged", command("merge", world, ftbase, tmp_path / "out"), signal.SIGHUP)
    assert code == 128 + signal.SIGHUP, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["convert", "merge"])
def test_sigterm_inside_the_publish_waits_for_a_complete_output(world, ftbase, tmp_path, name):  # noqa: F811
    out = tmp_path / "out"
    (out).mkdir()
    (out / "old.txt").write_text("the previous output\n")
    code, err = interrupt("publish", [*command(name, world, ftbase, out), "--overwrite"])
    assert code == 128 + signal.SIGTERM, err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # swapped whole; the old one is gone
    with Checkpoint.open(out) as written, Checkpoint.open(world["base"]) as base:
        assert sorted(written.keys()) == sorted(base.keys())
    assert not (out / "old.txt").exists()


def test_sigkill_leftovers_are_removed_by_the_next_run(world, ftbase, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    args = command("convert", world, ftbase, out)
    code, _ = interrupt("staged", args, signal.SIGKILL)
    assert code == -signal.SIGKILL
    left = leftovers(tmp_path)
    assert left == [".out.surgeon-lock", next(n for n in left if n.startswith(".out.surgeon-staging-"))]
    assert not out.exists()
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sigkill_during_a_fallback_publish_gets_the_old_output_back(world, ftbase, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert invoke("convert", world["base"], "-o", out).exit_code == 0
    old_bytes = (out / "model.safetensors").read_bytes()
    args = [*command("convert", world, ftbase, out), "--overwrite"]
    code, _ = interrupt("old", args, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not out.exists() and any("-old" in n for n in leftovers(tmp_path))  # the window of the fallback
    other = tmp_path / "other"
    assert invoke("convert", world["base"], "-o", other).exit_code == 0  # any write in this folder cleans up
    assert (out / "model.safetensors").read_bytes() == old_bytes  # the old output is back, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]


def test_second_writer_of_the_same_target_fails_at_once(world, ftbase, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    first = start("open", command("merge", world, ftbase, out))
    wait_at(first, "open")
    try:
        line = one_line(invoke("convert", world["base"], "-o", out), 1,
                        f"{out}: another surgeon run (pid {first.pid}) is writing this output; wait for it to finish "
                        "or choose another output.")
        assert line
        other = invoke("convert", world["base"], "-o", tmp_path / "elsewhere")  # other targets are not blocked
        assert other.exit_code == 0, other.output
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]
    assert invoke("convert", world["base"], "-o", out).exit_code == 0  # the lock went with the first run
