"""Turn a checkpoint argument (path or Hub repo id) into a local path."""

from __future__ import annotations

import os
from pathlib import Path

from surgeon.errors import CheckpointNotFoundError
from surgeon.io.output import note_input


def resolve_path(arg: str | os.PathLike[str], *, revision: str | None = None, token: str | None = None) -> Path:
    """A local file or folder for ``arg``.

    Local paths win. Otherwise ``org/name`` or ``org/name@revision`` is fetched
    from the Hugging Face Hub into the HF cache (safetensors, configs,
    tokenizer and card files only; see :mod:`surgeon.io.hub`) and the snapshot
    folder is returned. ``@revision`` in ``arg`` beats ``revision``, which beats
    the CLI's ``--revision``; the default is ``main``. With ``HF_HUB_OFFLINE=1``
    only the cache is used.
    """
    path = Path(arg)
    if path.exists():
        note_input(path)  # the running command never writes into it
        return path
    from surgeon.io.hub import download, parse_hub_arg  # huggingface_hub is imported only when needed

    parsed = parse_hub_arg(os.fspath(arg))
    if parsed is None:
        raise CheckpointNotFoundError(f"{arg}: no such file or folder; check the path.")
    repo_id, arg_revision = parsed
    local = download(repo_id, revision=arg_revision or revision, token=token)
    note_input(local)
    return local
