"""On-disk cache of base-matrix decompositions, keyed by the tensor's content.

Analysing many fine-tunes of one base decomposes each base matrix once. An entry is
one safetensors file (never pickle) holding ``basis`` (N × N float64: the complete
singular basis of the smaller side) and ``s`` (N float64, descending), with the side
("left"/"right"), shape and format version in its metadata. The key is the sha256 of
the tensor's stored bytes together with its dtype, shape and orientation, so a tensor
shared by several checkpoints (or renamed) hits the same entry, and a changed one never
does. Entries are written to a temporary file and renamed into place, so readers never
see half an entry; an unreadable or mismatched entry counts as a miss and is rewritten.

Default location: ``$SURGEON_CACHE_DIR``, else ``$XDG_CACHE_HOME/surgeon/svd``, else
``~/.cache/surgeon/svd``.
"""

from __future__ import annotations

import hashlib
import contextlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from surgeon.errors import OutputError, SurgeonError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.output import check_cache_folder
from surgeon.io.staging import pid_alive

FORMAT_VERSION = "1"
_KEY_PREFIX = b"surgeon-svd-cache-v" + FORMAT_VERSION.encode()


def default_cache_dir() -> Path:
    if os.environ.get("SURGEON_CACHE_DIR"):
        return Path(os.environ["SURGEON_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg) if xdg else Path.home() / ".cache"
    return root / "surgeon" / "svd"


def content_key(raw: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...], *, transposed: bool) -> str:
    """sha256 over (format version, dtype, shape, orientation, stored bytes), hex."""
    digest = hashlib.sha256(_KEY_PREFIX)
    digest.update(f"|{dtype}|{'x'.join(map(str, shape))}|{'T' if transposed else 'N'}|".encode())
    digest.update(raw)
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedBasis:
    """A cache entry: ``side`` "left"/"right", ``basis`` (N × N float64), ``s`` (N,) float64."""

    side: str
    basis: torch.Tensor
    s: torch.Tensor


class SvdCache:
    """Base decompositions on disk under ``root``; ``SvdCache(None)`` is a cache that never hits."""

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        self.root = Path(root).expanduser() if root is not None else None
        self._checked = False
        if self.root is not None and self.root.exists() and not self.root.is_dir():
            raise OutputError(
                f"{self.root}: the SVD cache location is a file; give a folder with --cache or pass --no-cache."
            )

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def path(self, key: str) -> Path:
        if self.root is None:
            raise ValueError("cache disabled")
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str, *, size: int) -> CachedBasis | None:
        """The entry for ``key`` if present and sound (N = ``size``), else None."""
        if self.root is None:
            return None
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with Checkpoint.open(path) as entry:
                meta = entry.metadata
                if (meta.get("surgeon_svd_cache") != FORMAT_VERSION or meta.get("side") not in ("left", "right")
                        or sorted(entry.keys()) != ["basis", "s"] or entry.info("basis").dtype != "F64"
                        or entry.info("basis").shape != (size, size) or entry.info("s").shape != (size,)):
                    return None
                return CachedBasis(meta["side"], entry.get("basis"), entry.get("s"))
        except (OSError, SurgeonError):
            return None

    def store(self, key: str, side: str, basis: torch.Tensor, s: torch.Tensor) -> None:
        """Write an entry atomically (temporary file + rename)."""
        if self.root is None:
            return
        if not self._checked:  # by the first store every input of the command has been opened (and noted)
            check_cache_folder(self.root)
            self._checked = True
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _clean_stale_temporaries(path.parent)
            save_file({"basis": basis.detach().to("cpu", torch.float64).contiguous(),
                       "s": s.detach().to("cpu", torch.float64).contiguous()},
                      tmp, metadata={"format": "pt", "surgeon_svd_cache": FORMAT_VERSION, "side": side})
            os.replace(tmp, path)
        except BaseException as exc:  # Ctrl-C or SIGTERM mid-write too: no temporary file stays in the cache
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not isinstance(exc, (OSError, SafetensorError)):  # safetensors reports a full disk as its own error
                raise
            raise OutputError(
                f"{path}: cannot write to the SVD cache ({getattr(exc, 'strerror', None) or str(exc).splitlines()[0]}); free disk space, choose another "
                "folder with --cache DIR, or pass --no-cache."
            ) from None


_TEMPORARY = re.compile(r"^\..+\.safetensors\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def _clean_stale_temporaries(folder: Path) -> None:
    """Remove the temporary entries of writers that are gone (a run killed with SIGKILL mid-write)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TEMPORARY.match(name)
        if m is not None and not pid_alive(int(m["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
