"""Staging entries beside an output and the publish step that swaps them into place.

Everything surgeon writes is first staged under a hidden name beside its target,
``.NAME.surgeon-staging-PID-XXXX`` (PID: the writing process), then published with one rename.
Where Linux allows it (``renameat2(RENAME_EXCHANGE)``) an existing target is swapped with the
staged one atomically, so there is no moment without a complete target; the old output then sits
under the staging name until it is removed. Entries whose process is gone are leftovers of a
killed run: :func:`clean_stale_staging` removes them at the start of every write and, where a
kill during a fallback publish left the old output as a hidden ``-old`` entry and no target,
puts the old output back.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

STAGING_MARK = ".surgeon-staging-"
_ENTRY = re.compile(r"^\.(?P<target>.+)" + re.escape(STAGING_MARK) + r"(?P<pid>\d+)-(?P<tag>[A-Za-z0-9.]+)$",
                    re.DOTALL)
_RENAME_EXCHANGE = 2


def staging_name(out_name: str, tag: str = "") -> str:
    """A fresh hidden entry name beside target ``out_name`` that marks this process as its writer."""
    return f".{out_name}{STAGING_MARK}{os.getpid()}-{tag}{secrets.token_hex(4)}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        try:
            entry.unlink()
        except OSError:
            pass


def clean_stale_staging(parent: Path) -> list[Path]:
    """Remove staging entries (folders or files) left in ``parent`` by processes that are gone.

    A stale ``-old`` entry whose target is missing is the old output of a publish that was killed
    between its two renames: it is renamed back to the target instead. Returns what was touched.
    """
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    touched = []
    for entry in entries:
        m = _ENTRY.match(entry.name)
        if m is None or pid_alive(int(m["pid"])):
            continue
        target = parent / m["target"]
        if m["tag"].startswith("old") and not os.path.lexists(target):
            try:
                os.rename(entry, target)
            except OSError:
                continue
        else:
            _remove(entry)
        touched.append(entry)
    return touched


def _libc_renameat2():  # type: ignore[no-untyped-def]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically; False where the system or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(source: Path, target: Path) -> None:
    """Put the complete ``source`` at ``target`` (replacing what is there); ``source`` is gone afterwards.

    An existing target is swapped in one step where possible and the old one removed; elsewhere it is
    first renamed to a hidden ``-old`` entry (restored by the next run if the process dies in between).
    """
    parent = target.parent
    if os.path.lexists(target):
        if exchange(source, target):
            _remove(source)  # now the old output
            fsync_dir(parent)
            return
        old = parent / staging_name(target.name, "old")
        os.rename(target, old)
        os.rename(source, target)
        _remove(old)
    else:
        os.rename(source, target)
    fsync_dir(parent)


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``, Linux 4.7+).

    Elsewhere the only way is to set and restore it, which for a moment gives other threads a
    umask of 0; surgeon does that only where ``/proc`` has no ``Umask:`` line.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
