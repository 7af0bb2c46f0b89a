"""The side files of an output model, with config.json telling the truth about its dtype.

A command that casts the weights (``merge``, ``convert``, ``apply`` with ``--dtype``) must not copy a
config.json that still says the old dtype: transformers loads a model with ``dtype="auto"`` in the dtype
the config names. One function for all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import torch_dtype_name

DTYPE_KEYS = ("torch_dtype", "dtype")  # transformers < 5 writes the first, >= 5 the second; both are read


def side_files(source: Checkpoint, dtype: str | None) -> tuple[list[Path], dict[str, str]]:
    """(files to copy as they are, {name: text} to write) for an output cast to the safetensors ``dtype``.

    ``dtype`` None means the weights keep their dtypes: every side file is copied. Otherwise config.json,
    when the source is a folder that has one, is rewritten with each dtype key it has (``torch_dtype`` if it has neither) set to
    ``dtype``'s torch name, and is copied unchanged when it already says so.
    """
    files = source.extra_files()
    config = source.config() if source.is_folder else None  # a lone file's neighbours are not its side files
    if dtype is None or config is None:
        return files, {}
    name = torch_dtype_name(dtype)
    keys = [k for k in DTYPE_KEYS if k in config] or [DTYPE_KEYS[0]]
    if all(config.get(k) == name for k in keys):
        return files, {}
    config.update({k: name for k in keys})
    return [f for f in files if f.name != "config.json"], {"config.json": json.dumps(config, indent=2) + "\n"}
