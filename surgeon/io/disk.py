"""Disk facts for one-line errors: a path fit for a message, free space, and full, read-only or
forbidden disks turned into :class:`~surgeon.errors.OutputError` with the remedy."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from surgeon.errors import OutputError
from surgeon.io.staging import staging_name


def show(path: str | os.PathLike[str]) -> str:
    """A path for a one-line message: control characters (a newline in a name) escaped."""
    text = os.fspath(path)
    return text if text.isprintable() else repr(text)[1:-1]


def check_free_space(out: Path, needed: int) -> None:
    """Raise if the file system that will hold ``out`` has fewer than ``needed`` bytes free."""
    try:
        st = os.statvfs(out.parent)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise OutputError(f"{show(out)}: not enough free space: the output needs {needed} bytes and "
                          f"{free} bytes are free on {show(out.parent)}; free some space or choose an output "
                          "on another disk.")


def disk_error(exc: OSError, out: Path, needed: int | None = None) -> OSError | OutputError:
    """``exc`` as one line with the remedy when it is a full, read-only or forbidden disk; else ``exc``."""
    where = show(out)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            st = os.statvfs(out.parent if out.parent.exists() else out.parent.parent)
            free = f"{st.f_bavail * st.f_frsize} bytes are free"
        except OSError:
            free = "the free space is unknown"
        need = f"the output needs {needed} bytes, " if needed is not None else ""
        return OutputError(f"{where}: the disk is full ({need}{free}); free some space or choose an output on "
                           "another disk. Nothing was published.")
    if exc.errno == errno.EROFS:
        return OutputError(f"{where}: the file system is read-only; choose an output on a writable disk.")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OutputError(f"{where}: no permission to write there; choose a folder you can write to.")
    if exc.errno == errno.EFBIG:
        return OutputError(f"{where}: the file system cannot hold a file this large; pass a smaller "
                           "--max-shard-size or choose another disk.")
    return exc


def check_writable(folder: Path, out: Path) -> None:
    """Prove that a file can be created in ``folder`` now (a read-only or full disk fails here)."""
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o600)
        os.close(fd)
        return
    except (AttributeError, IsADirectoryError):
        pass
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.EISDIR):
            raise disk_error(exc, out) from None
    probe = folder / staging_name(out.name, "probe")
    try:
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        finally:  # also when a signal lands between the two calls
            with contextlib.suppress(FileNotFoundError):
                probe.unlink()
    except OSError as exc:
        raise disk_error(exc, out) from None
