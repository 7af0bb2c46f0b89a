"""Reading a small input file (data, JSON config) that may be anything a hostile path points at.

A FIFO would block forever, ``/dev/zero`` would fill memory, a socket cannot be opened and a
folder cannot be read: :func:`read_regular_text` opens without blocking, refuses anything but a
regular file with one line naming it and what it is, and turns an unreadable file into one line
too. ``error`` is the :class:`SurgeonError` subclass of the caller's meaning.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from surgeon.errors import SurgeonError


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def not_regular(path: str | os.PathLike[str], mode: int, *, what: str, error: type[SurgeonError]) -> SurgeonError:
    named = what if "." in what else f"the {what}"
    return error(f"{path}: is {kind_of(mode)}, not a regular file; give {named} as a regular file "
                 "(surgeon reads it whole, so a pipe, device or socket cannot stand in for it).")


def check_regular(path: str | os.PathLike[str], *, what: str, error: type[SurgeonError]) -> None:
    """Raise ``error`` when ``path`` exists and is not a regular file (symlinks followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise not_regular(path, mode, what=what, error=error)


def read_regular_bytes(path: str | os.PathLike[str], *, what: str, error: type[SurgeonError]) -> bytes:
    """The bytes of the regular file ``path``; anything else is ``error`` in one line."""
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise error(f"{p}: no such {what}; check the path.") from None
    except OSError as exc:
        raise error(f"{p}: cannot read the {what} ({exc.strerror or exc}); check the path and its permissions.") from None
    if not stat.S_ISREG(mode):
        raise not_regular(p, mode, what=what, error=error)
    try:  # O_NONBLOCK: a FIFO swapped in after the stat opens at once instead of waiting for a writer
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise error(f"{p}: cannot read the {what} ({exc.strerror or exc}); check the path and its permissions.") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(p, mode, what=what, error=error)
        os.set_blocking(fd, True)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{p}: cannot read the {what} ({exc.strerror or exc}); check the file.") from None
    finally:
        os.close(fd)


def read_regular_text(path: str | os.PathLike[str], *, what: str, error: type[SurgeonError],
                      encoding: str = "utf-8") -> str:
    """:func:`read_regular_bytes` decoded; invalid text is ``error`` naming the byte."""
    raw = read_regular_bytes(path, what=what, error=error)
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise error(f"{path}: the {what} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.") from None
