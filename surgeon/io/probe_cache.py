"""A small on-disk memo of measurements about this machine (which merge routes give peft's bits for which
shapes), so that a measurement made once is not repeated by every later command.

One JSON object per machine key in the folder the native kernel is built in (``$XDG_CACHE_HOME/surgeon/
native``), read only when this user alone owns and can write both the file and its folder (a shared folder
could hold a planted answer), written to a temporary file and renamed into place. Best effort: a memo that
cannot be read or written is simply not used (the measurement is made again), never an error.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.io.output import check_cache_folder


class ProbeMemo:
    """``answers``: name -> bool, loaded from ``folder/<kind>-<key>.json``; :meth:`record` adds one and saves.
    ``private(path)``: whether only this user owns and may write ``path`` (the kernel's own check)."""

    def __init__(self, folder: Path, kind: str, key: str, private: Callable[[Path], bool]) -> None:
        self.path = folder / f"{kind}-{key}.json"
        self.private = private
        self.answers: dict[str, bool] = {}
        if private(self.path) and private(folder):
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                self.answers = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, bool)}
            except (OSError, ValueError, AttributeError):
                self.answers = {}

    def record(self, name: str, answer: bool) -> None:
        self.answers[name] = answer
        folder = self.path.parent
        tmp = folder / f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            check_cache_folder(folder)  # never inside an input or the output being written
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.private(folder):
                return
            tmp.write_text(json.dumps(self.answers, sort_keys=True), encoding="utf-8")
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)  # atomic; a concurrent writer's answers may be lost, then measured again
        except BaseException as exc:  # a signal mid-write too: no temporary file stays behind
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # e.g. the folder is a file: nothing was written
                pass
            if not isinstance(exc, (OSError, SurgeonError)):
                raise
