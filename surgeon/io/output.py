"""The rules for everything a command writes: checkpoints and side outputs alike.

* never into an input: every input a command reads (checkpoints, adapters, task vectors, data
  files) is noted by the readers in the active :class:`OutputGuard`, and every output is checked
  against all of them, after resolving symlinks and ``..``;
* never over an existing file without ``overwrite``;
* one writer per target: an ``fcntl`` lock on ``.NAME.surgeon-lock`` beside it, the second run
  fails at once naming the first;
* enough free space, checked up front where the size is known; a full or read-only disk is one
  line (:func:`disk_error`);
* side outputs (reports, plots, JSON) are checked before the main output is published and
  written atomically (:func:`write_side_output`, :func:`side_file`);
* SIGTERM and SIGHUP interrupt like Ctrl-C while a guard is active, so staging is cleaned up.

The CLI opens one guard per command (:func:`output_guard`); library callers may do the same.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

from surgeon.errors import NumericalError, OutputError
from surgeon.io.disk import check_free_space, check_writable, disk_error, show
from surgeon.io.locks import LOCK_SUFFIX, acquire_lock, clean_stale_locks, lock_path, release_lock
from surgeon.io.signals import Interrupted, signals_as_interrupts, signals_deferred
from surgeon.io.staging import STAGING_MARK, clean_stale_staging, current_umask, fsync_dir, staging_name
from surgeon.io.textfile import kind_of

if TYPE_CHECKING:
    import torch

_GUARD: ContextVar[OutputGuard | None] = ContextVar("surgeon_output_guard", default=None)


class OutputGuard:
    """What one command reads and writes: its inputs, its locks, the folders it created."""

    def __init__(self) -> None:
        self.inputs: list[Path] = []
        self._releases: list[Path] = []
        self._created: list[Path] = []
        self.allow_non_finite = False  # --allow-non-finite: write NaN/Inf instead of refusing them
        self.work: list[Path] = []  # folders a command fills itself (claim_work_folder): caches may go inside

    def note_input(self, path: str | os.PathLike[str]) -> None:
        resolved = Path(path).resolve()
        if resolved not in self.inputs:
            self.inputs.append(resolved)

    def lock(self, target: Path) -> None:
        with signals_deferred():  # held and recorded for release as one step (an interrupt between: a stale lock)
            acquire_lock(target)
            self._releases.append(target)

    def created(self, folders: Iterable[Path]) -> None:
        self._created.extend(folders)

    def close(self, *, failed: bool) -> None:
        for target in reversed(self._releases):
            release_lock(target)  # first: the lock file sits in a folder that may have to go
        self._releases.clear()
        if failed:
            remove_empty(self._created)


def current_guard() -> OutputGuard | None:
    return _GUARD.get()


def note_input(path: str | os.PathLike[str]) -> None:
    """Called by every reader: ``path`` is an input of the running command (no-op outside a guard)."""
    guard = _GUARD.get()
    if guard is not None:
        guard.note_input(path)


@contextlib.contextmanager
def output_guard() -> Iterator[OutputGuard]:
    """Scope one command: inputs noted, locks held and SIGTERM/SIGHUP caught until the block ends."""
    guard = OutputGuard()
    token = _GUARD.set(guard)
    failed = True
    try:
        with signals_as_interrupts():
            yield guard
        failed = False
    finally:
        guard.close(failed=failed)
        _GUARD.reset(token)


# -- checks -------------------------------------------------------------------------------------
def _is_within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def _same_file(target: Path, src: Path) -> bool:
    """``target`` is ``src``, or a hard link of a file directly in the input folder ``src``."""
    if os.path.samefile(target, src):
        return True
    st = target.stat()
    if not target.is_file() or st.st_nlink < 2 or not src.is_dir():
        return False
    try:
        return any(p.is_file() and os.path.samefile(p, target) for p in src.iterdir())
    except OSError:
        return False


def check_not_input(out: Path, inputs: Iterable[str | os.PathLike[str]] = (), *, what: str = "output") -> Path:
    """The resolved ``out``; raise if it lies in, holds or is (the same file as) any input."""
    target = out.resolve()
    guard = _GUARD.get()
    known = [(Path(p), Path(p).resolve()) for p in inputs] + [(p, p) for p in (guard.inputs if guard else [])]
    for shown, src in known:
        same = target.exists() and src.exists() and _same_file(target, src)
        if same or _is_within(target, src) or _is_within(src, target):
            fix = "Choose another output folder." if what == "output" else f"Choose another {what} path."
            raise OutputError(f"{show(out)}: the {what} overlaps the input {show(shown)}; surgeon never writes "
                              f"over its inputs. {fix}")
    return target


def check_cache_folder(folder: Path) -> None:
    """A cache written while a command runs (``--cache DIR``) is a side output too: never inside an input
    or inside the output being written (it would be swapped away with the old output)."""
    check_not_input(folder, what="SVD cache folder")
    guard = _GUARD.get()
    resolved = folder.resolve()
    for target in guard._releases if guard is not None else []:
        if target in guard.work:  # type: ignore[union-attr]
            continue
        if _is_within(resolved, target) or _is_within(target, resolved):
            raise OutputError(f"{show(folder)}: the SVD cache folder overlaps the output {show(target)}; choose a "
                              "--cache DIR outside it.")


def refuse_special(out: Path, target: Path) -> None:
    """Never replace a device, FIFO or socket (``--html /dev/null --overwrite`` would replace /dev/null)."""
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OutputError(f"{show(out)}: is {kind_of(mode)}, not a file or folder; surgeon never replaces one: "
                          "choose another output path.")


def make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created (deepest last), for removal on failure."""
    missing = []
    probe = folder
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"{show(probe)} is a file, not a folder; choose another output path.")
    created = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
    except FileExistsError:
        pass
    except OSError as exc:
        remove_empty(created)
        raise disk_error(exc, folder) from None
    guard = _GUARD.get()
    if guard is not None:
        guard.created(created)
    return created


def remove_empty(folders: Iterable[Path]) -> None:
    for path in reversed(list(folders)):
        with contextlib.suppress(OSError):
            path.rmdir()


def check_output(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = (), *,
                 overwrite: bool) -> Path:
    """Refuse a checkpoint output that would touch an input or replace something without ``overwrite``;
    create its parent folders (removed again if the command fails) and, inside a guard, lock it."""
    out = Path(out)
    target = check_not_input(out, inputs)
    clean_stale_locks(target.parent)
    clean_stale_staging(target.parent)  # first: a killed publish may have left the old output to restore
    refuse_special(out, target)
    if target.exists():
        if target.is_file() and not str(out).endswith(".safetensors"):
            raise OutputError(f"{show(out)}: exists and is a file; choose a folder name for the output.")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise OutputError(f"{show(out)}: output folder is not empty; choose another or pass --overwrite to "
                              "replace it.")
        if target.is_file() and not overwrite:
            raise OutputError(f"{show(out)}: output file exists; choose another or pass --overwrite to replace it.")
    make_parents(target.parent)
    guard = _GUARD.get()
    if guard is not None and target not in guard._releases:
        guard.lock(target)
    return target


def claim_work_folder(out: Path, *, overwrite: bool, owned: Iterable[str], what: str = "output folder") -> Path:
    """A folder a long command fills step by step (``surgeon demo``): locked for this run, refused when it
    holds anything unless ``overwrite``, and even then replaced only when it holds one of ``owned`` (the
    files an earlier run of the command wrote), so that ``-o ~ --overwrite`` can never empty a home folder."""
    target = out.resolve()
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder; choose another -o folder.")
    make_parents(target.parent)
    guard = _GUARD.get()
    if guard is not None and target not in guard._releases:
        guard.lock(target)
        guard.work.append(target)
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise OutputError(f"{target}: folder is not empty; choose a new -o folder or pass --overwrite to replace it.")
        names = sorted(owned)
        if not any((target / name).exists() for name in names):
            raise OutputError(f"{target}: holds files no earlier run wrote (none of {', '.join(names)}); --overwrite "
                              f"replaces only a {what} surgeon wrote: choose a new -o folder or empty this one yourself.")
        shutil.rmtree(target)
    target.mkdir(exist_ok=True)
    return target


NON_FINITE_FIX = ("check the inputs for NaN/Inf (a corrupt or diverged checkpoint), a weight or λ too large for the "
                  "output dtype (fp16 holds at most 65504) or pass --allow-non-finite to write them anyway")


def refuse_non_finite(tensor: torch.Tensor, *, where: str | os.PathLike[str], name: str, fix: str = NON_FINITE_FIX,
                      role: str = "would be written with") -> None:
    """Raise :class:`NumericalError` naming ``name`` in ``where`` when ``tensor`` holds NaN or ±Inf."""
    from surgeon.ops.finite import non_finite_count

    bad = non_finite_count(tensor)
    if bad:
        raise NumericalError(f"{show(where)}: tensor {name!r} {role} {bad} NaN/Inf value(s) of {tensor.numel()}; {fix}.")


# -- side outputs -------------------------------------------------------------------------------
def check_not_output(path: Path, outputs: Iterable[str | os.PathLike[str] | None], *, what: str) -> None:
    """A side file never goes into (or over) the command's main output."""
    resolved = path.resolve()
    for other in (Path(o) for o in outputs if o is not None):
        if resolved == other.resolve() or other.resolve() in resolved.parents:
            raise OutputError(f"{show(path)}: the {what} would be written into the output {show(other)}; "
                              f"choose a {what} path outside it.")


def check_side_output(path: str | os.PathLike[str], *, overwrite: bool, inputs: Iterable[str | os.PathLike[str]] = (),
                      outputs: Iterable[str | os.PathLike[str] | None] = (), what: str = "report") -> Path:
    """Everything that can be checked about a side output before the main output is published: never
    into an input, never into or over the command's other ``outputs`` (its checkpoint folder, which is
    published whole and swapped away by the next ``--overwrite``)."""
    out = Path(path)
    check_not_output(out, outputs, what=what)
    target = check_not_input(out, inputs, what=what)
    if target.is_dir():
        raise OutputError(f"{show(out)}: is a folder; give a file name for the {what}.")
    refuse_special(out, target)
    if os.path.lexists(target) and not overwrite:
        raise OutputError(f"{show(out)}: the {what} file exists; choose another or pass --overwrite to replace it.")
    make_parents(target.parent)
    check_writable(target.parent, out)
    clean_stale_staging(target.parent)  # a side file a killed run (kill -9) left half-written
    return target


@contextlib.contextmanager
def side_file(path: str | os.PathLike[str], *, overwrite: bool, inputs: Iterable[str | os.PathLike[str]] = (),
              outputs: Iterable[str | os.PathLike[str] | None] = (), what: str = "report") -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) to write into; published atomically when the block
    ends without error, removed otherwise."""
    target = check_side_output(path, overwrite=overwrite, inputs=inputs, outputs=outputs, what=what)
    tmp = target.parent / (staging_name(target.name, "side") + target.suffix)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, target)
        else:  # link fails if a file appeared meanwhile: never replace one without --overwrite
            os.link(tmp, target)
        fsync_dir(target.parent)
    except FileExistsError:
        raise OutputError(f"{show(path)}: the {what} file appeared while surgeon was writing it; choose another "
                          "or pass --overwrite.") from None
    except OSError as exc:
        raise disk_error(exc, Path(path)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_side_output(path: str | os.PathLike[str], data: str | bytes, *, overwrite: bool,
                      inputs: Iterable[str | os.PathLike[str]] = (),
                      outputs: Iterable[str | os.PathLike[str] | None] = (), what: str = "report") -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` under the side-output rules; returns the resolved path."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with side_file(path, overwrite=overwrite, inputs=inputs, outputs=outputs, what=what) as tmp:
        with open(tmp, "xb") as fh:
            fh.write(raw)
    return Path(path).resolve()


__all__ = ["LOCK_SUFFIX", "STAGING_MARK", "Interrupted", "OutputGuard", "acquire_lock", "check_free_space",
           "check_cache_folder", "check_not_input", "check_not_output", "check_output", "claim_work_folder", "check_side_output", "check_writable", "clean_stale_locks",
           "clean_stale_staging", "current_guard", "disk_error", "lock_path", "make_parents", "note_input",
           "output_guard", "refuse_non_finite", "release_lock", "show", "side_file", "signals_as_interrupts",
           "signals_deferred", "write_side_output"]
