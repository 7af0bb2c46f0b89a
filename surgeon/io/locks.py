"""One writer per target: an ``fcntl`` lock on ``.NAME.surgeon-lock`` beside it.

The lock file is removed (while still locked) when the run ends; a second opener notices the inode
change and locks the new file. A run killed with SIGKILL leaves the file unlocked: the next write
into that folder removes it (:func:`clean_stale_locks`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

from surgeon.errors import OutputError
from surgeon.io.disk import disk_error, show
from surgeon.io.signals import signals_deferred

LOCK_SUFFIX = ".surgeon-lock"
_HELD: dict[Path, list[int]] = {}  # target -> [lock fd, holders]; flock is per open file, so one fd per process
_HELD_LOCK = threading.Lock()


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _holder(path: Path) -> str:
    try:
        text = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"


def acquire_lock(target: Path) -> None:
    """Lock ``target`` for this process (re-entrant); raise at once if another process holds it.

    SIGTERM/SIGHUP/SIGINT wait until the lock is recorded as held: between creating the lock file and
    recording it, an interrupt would leave the file beside the target with nobody to remove it."""
    target = target.resolve()
    with signals_deferred(), _HELD_LOCK:
        if target in _HELD:
            _HELD[target][1] += 1
            return
        path = lock_path(target)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise disk_error(exc, target) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"{show(target)}: another surgeon run ({_holder(path)}) is writing this output; "
                                  "wait for it to finish or choose another output.") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the last holder removed the file after we opened it: lock the new one
                break
            os.close(fd)
        with contextlib.suppress(OSError):  # the pid only names us to a second writer; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        _HELD[target] = [fd, 1]


def clean_stale_locks(parent: Path) -> None:
    """Remove lock files in ``parent`` that nobody holds (left by a process killed with SIGKILL)."""
    try:
        entries = [p for p in parent.iterdir() if p.name.endswith(LOCK_SUFFIX)]
    except OSError:
        return
    for path in entries:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.unlink(path)
        except OSError:
            pass  # held by a live run, or already gone
        finally:
            os.close(fd)


def release_lock(target: Path) -> None:
    target = target.resolve()
    with _HELD_LOCK:
        held = _HELD.get(target)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[target]
        with contextlib.suppress(OSError):
            os.unlink(lock_path(target))  # while still locked: a waiting opener sees the inode change
        os.close(held[0])
