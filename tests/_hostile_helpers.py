"""Shared by the tests/test_hostile_*.py modules: a small world of real inputs (a tiny Llama, a peft
LoRA, its peft merge, a task vector), byte digests of every input, the one-line check, leftovers,
subprocess runs of `python -m surgeon`, and real tmpfs mounts (root only)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from _diff_helpers import make_lora_adapter, merge_with_peft
from surgeon.cli.main import cli

REPO = Path(__file__).resolve().parents[1]


def digest(*paths: Path) -> dict[str, str]:
    """Every file under ``paths`` (names, symlink targets and bytes) as one comparable dict."""
    out: dict[str, str] = {}
    for root in paths:
        root = Path(root)
        items = [root] if not root.is_dir() else sorted(p for p in root.rglob("*"))
        for p in items:
            key = str(p)
            if p.is_symlink():
                out[key] = "link:" + os.readlink(p)
            elif p.is_file():
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[key] = "dir"
    return out


def invoke(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line(result: object, code: int = 1, *fragments: str) -> str:
    """The run failed with ``code`` and printed exactly one ``Error:`` line holding every fragment."""
    output = result.output  # type: ignore[attr-defined]
    assert result.exit_code == code, output  # type: ignore[attr-defined]
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Hidden surgeon entries (staging, scratch, side temp files, locks) in ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir() if ".surgeon-" in p.name)


def surgeon_argv(*args: object) -> list[str]:
    return [sys.executable, "-m", "surgeon", *(str(a) for a in args)]


def default_signals() -> None:
    """``preexec_fn`` of signal-test children: SIGHUP/SIGTERM at their default action, as in a login shell,
    even when the test run itself was started under ``nohup`` (which hands SIG_IGN down)."""
    import signal

    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "HF_HUB_OFFLINE": "1"}


def run_cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(surgeon_argv(*args), capture_output=True, text=True, env=env(), timeout=timeout)


def can_mount() -> str | None:
    """None when a tmpfs can be mounted here, else why not (the reason a test is skipped with)."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    where = tempfile.mkdtemp(prefix="surgeon-mnt-probe-")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", where], capture_output=True)
        if done.returncode != 0:
            return f"mount -t tmpfs refused here: {done.stderr.decode().strip()}"
        subprocess.run(["umount", where], check=True)
        return None
    finally:
        os.rmdir(where)


@contextlib.contextmanager
def tmpfs(size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A real tmpfs of ``size`` (``ro`` when asked), unmounted afterwards."""
    why = can_mount()
    if why is not None:
        pytest.skip(why)
    where = Path(tempfile.mkdtemp(prefix="surgeon-mnt-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def world(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real inputs, made by transformers/peft (and one task vector by `surgeon diff`)."""
    root = tmp_path_factory.mktemp("hostile")
    base = root / "base"
    shutil.copytree(tiny_llama, base)
    adapter = make_lora_adapter(base, root / "adapter")
    merged = merge_with_peft(base, adapter, root / "merged")
    tv = root / "tv"
    result = invoke("diff", merged, base, "-o", tv)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(f'{{"text": "t{i} good", "label": "{i % 2}"}}\n' for i in range(8)))
    return {"root": root, "base": base, "adapter": adapter, "merged": merged, "tv": tv, "data": data}


def inputs_of(world: dict[str, Path]) -> dict[str, str]:
    return digest(*(world[k] for k in ("base", "adapter", "merged", "tv", "data")))
