"""`surgeon <command> --help` loads no torch, transformers or peft: help prints at once, whatever the command.

One fresh interpreter asks every command of ``COMMANDS`` for its help in turn (then the group's own
help, which loads every command module) and says, after each, which heavy modules are loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from surgeon.cli.main import COMMANDS

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft")

PROBE = f"""
import contextlib, io, json, sys
from surgeon.cli.main import COMMANDS, cli

found = {{}}
for name in [*COMMANDS, ""]:  # "" last: `surgeon --help` imports every command module
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(args=[name, "--help"] if name else ["--help"], prog_name="surgeon", standalone_mode=False)
    found[name] = {{"code": code, "help": out.getvalue(), "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def helps() -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", [*COMMANDS, ""])
def test_help_prints_without_torch(helps, name):
    got = helps[name]
    assert got["code"] == 0
    assert got["help"].startswith(f"Usage: surgeon {name}".rstrip())
    # modules stay loaded: the first command listed with them is the one that imported them
    assert got["heavy"] == [], f"{', '.join(got['heavy'])} loaded by the end of `surgeon {name} --help`"
