"""Run a command in a child process and report its wall time and peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence

_WRAPPER = (
    "import resource, subprocess, sys, time, json;"
    "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode; dt = time.perf_counter() - t;"
    "print(json.dumps({'rc': rc, 'wall': dt, 'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
)


def measure(cmd: Sequence[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``cmd``; raises if it fails."""
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True)
    try:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"measuring {cmd} failed:\n{out.stdout}\n{out.stderr}") from None
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd} exited {result['rc']}:\n{out.stderr[-2000:]}")
    return result["wall"], result["rss_kb"] / 1024


def warm_cache(path: str) -> None:
    """Read a folder once so that every contender starts with the same page cache."""
    subprocess.run(["bash", "-c", f"cat {path}/* > /dev/null"], check=True)


def timer() -> float:
    return time.perf_counter()
