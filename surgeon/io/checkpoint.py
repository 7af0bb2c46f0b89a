"""Lazy, validated reading of safetensors checkpoints, one tensor at a time.

A checkpoint is a ``.safetensors`` file or a folder holding one
``*.safetensors`` file or shards listed by a ``*.safetensors.index.json``.
Opening one reads and validates every header; tensors are read on demand
with ``pread`` into a buffer of exactly their size, so resident memory stays
bounded by the tensor being worked on and a file truncated under us raises
:class:`CheckpointFormatError` instead of a SIGBUS.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy

from surgeon.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    PickleRefusedError,
)
from surgeon.io.format import FileHeader, TensorInfo, pread_into, read_header
from surgeon.io.output import note_input
from surgeon.io.textfile import check_regular

if TYPE_CHECKING:
    import torch

_NUMPY_FLOATS = {"F16": numpy.float16, "F32": numpy.float32, "F64": numpy.float64}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# Files that describe weights rather than accompany them; never copied as "extra files".
_NOT_EXTRA = {"README.md", ".gitattributes", "surgeon_provenance.json"}


def _refuse_pickle(path: Path) -> PickleRefusedError:
    return PickleRefusedError(
        f"{path}: pickle weights are refused: loading them can run arbitrary code, and surgeon never unpickles. "
        "Convert them to safetensors first (e.g. transformers' save_pretrained(..., safe_serialization=True)) "
        "or download the repo's .safetensors files."
    )


class Checkpoint:
    """A read-only view of a safetensors checkpoint.

    >>> with Checkpoint.open("path/to/model") as ckpt:        # doctest: +SKIP
    ...     for name in ckpt.keys():
    ...         w = ckpt.get(name, dtype=torch.float32)

    Tensors are listed in file order (shard by shard, by data offset).
    """

    def __init__(self, root: Path, headers: list[FileHeader], index_file: Path | None) -> None:
        self.root = root
        self.headers = headers
        self.index_file = index_file
        self.tensors: dict[str, TensorInfo] = {}
        for header in headers:
            self.tensors.update(header.tensors)
        self._fds: dict[Path, int] = {}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, prefix: str | None = None) -> Checkpoint:
        """Open and validate a checkpoint file or folder.

        ``prefix`` picks the weights name in a folder that holds several
        (``"model"``, ``"adapter_model"``); by default the folder's only one.
        """
        path = Path(path)
        if not path.exists():
            raise CheckpointNotFoundError(
                f"{path}: no such file or folder; check the path (a Hub model is given as org/name)."
            )
        note_input(path)  # the running command never writes into it
        if not path.is_file() and not path.is_dir():
            raise CheckpointFormatError(f"{path}: is not a regular file or folder (a FIFO, device or socket); "
                                        "give a .safetensors file or a model folder.")
        if path.is_file():
            if path.name.endswith(".safetensors.index.json"):
                return cls._open_index(path.parent, path)
            if path.suffix in PICKLE_SUFFIXES:
                raise _refuse_pickle(path)
            if path.suffix != ".safetensors":
                raise CheckpointFormatError(
                    f"{path}: not a .safetensors file; give a safetensors file or a model folder."
                )
            return cls(path, [read_header(path)], None)
        return cls._open_folder(path, prefix)

    @classmethod
    def _open_folder(cls, folder: Path, prefix: str | None) -> Checkpoint:
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
        if prefix is not None:
            names = [n for n in names if n.startswith(prefix + ".") or n.startswith(prefix + "-")]
        indexes = [n for n in names if n.endswith(".safetensors.index.json")]
        singles = [n for n in names if n.endswith(".safetensors")]
        if indexes:
            if len(indexes) > 1:
                raise CheckpointFormatError(
                    f"{folder}: several index files ({', '.join(indexes)}); keep one, or give the index file as the path."
                )
            stem = indexes[0][: -len(".index.json")]
            if stem in singles:
                raise CheckpointFormatError(
                    f"{folder}: holds both {stem} and {indexes[0]}; one of them is stale. "
                    f"Delete the index if {stem} is the whole model, or delete {stem} if the shards are."
                )
            return cls._open_index(folder, folder / indexes[0])
        if len(singles) == 1:
            return cls(folder, [read_header(folder / singles[0])], None)
        if len(singles) > 1:
            raise CheckpointFormatError(
                f"{folder}: {len(singles)} .safetensors files but no *.safetensors.index.json to say how they fit together; "
                "add the index or give one file as the path."
            )
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise _refuse_pickle(folder / pickles[0])
        raise CheckpointNotFoundError(
            f"{folder}: no .safetensors weights in this folder; give a model folder or a .safetensors file."
        )

    @classmethod
    def _open_index(cls, folder: Path, index_path: Path) -> Checkpoint:
        try:
            index = json.loads(index_path.read_text("utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointFormatError(
                f"{index_path}: not a valid index (expected JSON with a 'weight_map' object); re-download or re-export it."
            ) from None
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise CheckpointFormatError(f"{index_path}: weight_map entry for {key!r} is not a file name; re-download or re-export the index.")
            shards.setdefault(shard, []).append(key)
        headers = []
        owner: dict[str, str] = {}
        for shard, keys in shards.items():
            shard_path = folder / shard
            # Names only, not resolved targets: the HF cache stores shards as symlinks into blobs/.
            if os.path.isabs(shard) or ".." in Path(shard).parts:
                raise CheckpointFormatError(
                    f"{index_path}: weight_map points {keys[0]!r} to {shard!r}, outside the checkpoint folder; "
                    "refusing to read it. Fix the index to name shards inside the folder."
                )
            if not shard_path.is_file():
                raise CheckpointFormatError(
                    f"{index_path}: shard {shard!r} (holding {keys[0]!r}) is missing; download it again."
                )
            if shard_path.suffix in PICKLE_SUFFIXES:
                raise _refuse_pickle(shard_path)
            header = read_header(shard_path)
            for name in header.tensors:
                if name in owner:
                    raise CheckpointFormatError(
                        f"{folder}: tensor {name!r} is stored in two shards ({owner[name]} and {shard}); "
                        "the checkpoint is inconsistent. Re-export it."
                    )
                owner[name] = shard
            headers.append(header)
        for key, shard in weight_map.items():
            if owner.get(key) != shard:
                where = f"it is in {owner[key]}" if key in owner else "no shard holds it"
                raise CheckpointFormatError(
                    f"{index_path}: index puts {key!r} in {shard} but {where}; the index is stale. Re-download or re-export it."
                )
        extra = sorted(set(owner) - set(weight_map))
        if extra:
            raise CheckpointFormatError(
                f"{index_path}: tensor {extra[0]!r} is in shard {owner[extra[0]]} but not in the index; the index is stale. "
                "Re-download or re-export it."
            )
        return cls(folder, headers, index_path)

    # -- queries ---------------------------------------------------------------------------------
    @property
    def is_folder(self) -> bool:
        return self.root.is_dir()

    @property
    def folder(self) -> Path:
        """The folder holding the weights (the file's parent for a single file)."""
        return self.root if self.root.is_dir() else self.root.parent

    @property
    def files(self) -> list[Path]:
        return [h.path for h in self.headers]

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.headers[0].metadata) if self.headers else {}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointFormatError(f"{self.root}: no tensor named {name!r}.") from None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def config(self) -> dict[str, Any] | None:
        """The folder's config.json, if any."""
        path = self.folder / "config.json"
        check_regular(path, what="config.json", error=CheckpointFormatError)  # a FIFO would block or be dropped
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointFormatError(f"{path}: not valid JSON ({exc}); fix or re-download it.") from None
        return data if isinstance(data, dict) else None

    def extra_files(self) -> list[Path]:
        """Non-weight files that travel with the model (config, tokenizer, chat template, ...)."""
        if not self.is_folder:
            return []
        out = []
        for p in sorted(self.folder.iterdir()):
            if not p.name.startswith(".") and not p.is_dir():  # a FIFO or socket: never silently left out
                check_regular(p, what="model folder's file", error=CheckpointFormatError)
            if not p.is_file() or p.name.startswith(".") or p.name in _NOT_EXTRA:
                continue
            if p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
                continue
            out.append(p)
        return out

    # -- reading -------------------------------------------------------------------------------
    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        return fd

    def read_raw(self, name: str) -> bytearray:
        """The tensor's stored bytes, exactly as in the file."""
        info = self.info(name)
        buf = bytearray(info.nbytes)
        if info.nbytes:
            pread_into(self._fd(info.file), memoryview(buf), info.start, info.file)
        return buf

    def float32_array(self, name: str) -> numpy.ndarray:
        """A floating tensor as a float32 numpy array, without torch (BF16/F16 widened exactly, F64 rounded
        to nearest as torch's ``.float()`` does)."""
        info = self.info(name)
        raw = numpy.frombuffer(self.read_raw(name), dtype=numpy.uint8)
        if info.dtype == "BF16":
            out = numpy.left_shift(raw.view(numpy.uint16), 16, dtype=numpy.uint32).view(numpy.float32)
        elif info.dtype in _NUMPY_FLOATS:
            out = raw.view(_NUMPY_FLOATS[info.dtype]).astype(numpy.float32)
        else:
            raise CheckpointFormatError(f"{info.file}: tensor {name!r} is {info.dtype}, not a floating dtype.")
        return out.reshape(info.shape)

    def fd_and_span(self, name: str) -> tuple[int, int, int]:
        """(file descriptor, absolute start, length) for zero-copy transfers."""
        info = self.info(name)
        return self._fd(info.file), info.start, info.nbytes

    def get(
        self, name: str, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
    ) -> torch.Tensor:
        """Load one tensor (stored dtype unless ``dtype`` is given) onto ``device`` (CPU by default)."""
        import torch

        info = self.info(name)
        if info.numel == 0:
            tensor = torch.empty(info.shape, dtype=info.torch_dtype)
        else:
            tensor = torch.frombuffer(self.read_raw(name), dtype=info.torch_dtype).reshape(info.shape)
        if dtype is not None or device is not None:
            tensor = tensor.to(device=device, dtype=dtype)
        return tensor

    def iter_tensors(
        self, names: list[str] | None = None, *, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names if names is not None else self.keys():
            yield name, self.get(name, dtype=dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.root)!r}, tensors={len(self.tensors)}, files={len(self.headers)})"
