"""Turn a checkpoint argument (path or Hub repo id) into a local path."""

from __future__ import annotations

import os
from pathlib import Path

from surgeon.errors import CheckpointNotFoundError


def resolve_path(arg: str | os.PathLike[str]) -> Path:
    """A local file or folder for ``arg``.

    Local paths win; anything else is an error naming the path.
    """
    path = Path(arg)
    if path.exists():
        return path
    raise CheckpointNotFoundError(f"{arg}: no such file or folder; check the path.")
