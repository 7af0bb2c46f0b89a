"""The safetensors file format: dtype tables, strict header parsing, header building.

safetensors' own parser is lenient where surgeon must not be (it silently keeps
the last of two tensors with one name, and mmaps the file so that a file
truncated under us kills the process). This module parses and validates a
header from a handful of bounded reads and never maps the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import CheckpointFormatError, IncompleteDownloadError, OptionError

if TYPE_CHECKING:
    import torch

# safetensors dtype string -> (name of the torch dtype, bytes per element). Names, not torch objects:
# this module (and the streamed merge above it) must not import torch, which costs ~2 s to start.
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
_TORCH_NAME_TO_ST = {torch_name: name for name, (torch_name, _) in DTYPES.items()}

# Friendly names accepted on the command line (--dtype).
DTYPE_ALIASES: dict[str, str] = {
    "fp32": "F32", "float32": "F32", "f32": "F32",
    "fp16": "F16", "float16": "F16", "half": "F16", "f16": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
    "fp64": "F64", "float64": "F64",
}

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
_SNIFF_BYTES = 512


FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # the floating dtypes surgeon computes in and writes

_REMEDY = "download it again, or re-save it with safetensors (save_file, save_pretrained) from the tool that wrote it."


def parse_dtype(name: str | None) -> str | None:
    """A ``--dtype`` value: 'bf16' -> 'BF16'; None/'auto' -> None (keep each tensor's dtype)."""
    if name is None or name.lower() == "auto":
        return None
    key = DTYPE_ALIASES.get(name.lower(), name.upper())
    if key not in FLOAT_DTYPES:
        raise OptionError(f"--dtype {name!r} is not a float dtype surgeon writes; use auto, fp32, fp16 or bf16.")
    return key


def dtype_size(st_dtype: str) -> int:
    return DTYPES[st_dtype][1]


def torch_dtype_name(st_dtype: str) -> str:
    """'BF16' -> 'bfloat16': the torch dtype's name, as config.json's ``torch_dtype``/``dtype`` spell it."""
    return DTYPES[st_dtype][0]


def torch_dtype(st_dtype: str) -> torch.dtype:
    import torch

    return getattr(torch, torch_dtype_name(st_dtype))


def st_dtype(dtype: torch.dtype) -> str:
    try:
        return _TORCH_NAME_TO_ST[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise CheckpointFormatError(
            f"dtype {dtype} cannot be stored in safetensors; cast the tensor to one of "
            f"{', '.join(sorted(DTYPES))} first"
        ) from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte span, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


@dataclass(frozen=True)
class FileHeader:
    """A validated safetensors header."""

    path: Path
    header_size: int  # bytes of JSON after the 8-byte length prefix
    data_start: int  # absolute offset of the data buffer
    file_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]  # in data-offset order


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def pread_exact(fd: int, size: int, offset: int, path: Path) -> bytes:
    """Read exactly ``size`` bytes at ``offset`` or raise (file truncated under us)."""
    chunks = []
    got = 0
    while got < size:
        chunk = os.pread(fd, min(size - got, 1 << 30), offset + got)
        if not chunk:
            raise CheckpointFormatError(
                f"{path}: file ended after {offset + got} bytes while reading {size} bytes at "
                f"offset {offset}; it was truncated or is still being written. Download it again."
            )
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def pread_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill ``buffer`` from ``offset`` with bounded reads (no mmap)."""
    got = 0
    size = len(buffer)
    while got < size:
        n = os.preadv(fd, [buffer[got : got + min(size - got, 1 << 30)]], offset + got)
        if n == 0:
            raise CheckpointFormatError(
                f"{path}: file ended after {offset + got} bytes while reading {size} bytes at "
                f"offset {offset}; it was truncated or is still being written. Download it again."
            )
        got += n


def _looks_like_text_download(head: bytes) -> str | None:
    stripped = head.lstrip()
    if stripped.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer file"
    lowered = stripped[:64].lower()
    if lowered.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "an HTML page"
    if lowered.startswith((b"{\"error\"", b"entry not found", b"not found", b"access denied")):
        return "an error message from a server"
    return None


def read_header(path: Path, fd: int | None = None) -> FileHeader:
    """Parse and validate the header of one safetensors file.

    Checks everything that can be checked without reading the data: length
    prefix, JSON, duplicate names, dtypes, shapes against byte spans, offsets
    that are contiguous and non-overlapping, and the file size (no truncation,
    no trailing bytes).
    """
    own_fd = fd is None
    if fd is None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointFormatError(f"{path}: cannot open ({exc.strerror}); check permissions") from None
    try:
        return _parse_header(path, fd)
    finally:
        if own_fd:
            os.close(fd)


def _parse_header(path: Path, fd: int) -> FileHeader:
    file_size = os.fstat(fd).st_size
    if file_size == 0:
        raise CheckpointFormatError(f"{path}: file is empty (0 bytes); the download or write did not finish. Download it again.")
    head = os.pread(fd, _SNIFF_BYTES, 0)
    kind = _looks_like_text_download(head)
    if kind is not None:
        raise IncompleteDownloadError(
            f"{path}: this is {kind}, not safetensors data; it looks like an incomplete download. "
            "Download the real file again (for LFS: `git lfs pull`, or use huggingface_hub)."
        )
    if file_size < 8:
        raise CheckpointFormatError(f"{path}: file is {file_size} bytes, too short for a safetensors header (8-byte length prefix). Download it again.")
    (n,) = struct.unpack("<Q", head[:8])
    if n > file_size - 8:
        raise CheckpointFormatError(
            f"{path}: header length prefix says {n} bytes but the file has only {file_size - 8} bytes after it; "
            "the file is truncated or not safetensors. Download it again."
        )
    if n > MAX_HEADER_BYTES:
        raise CheckpointFormatError(f"{path}: header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit; this is not a valid safetensors file.")
    raw = pread_exact(fd, n, 8, path)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as dup:
        raise CheckpointFormatError(
            f"{path}: tensor name {dup.key!r} appears twice in the header (safetensors would silently keep the last one); "
            "the file is corrupt. Re-export it."
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{path}: header is not valid JSON ({exc}); the file is corrupt or not safetensors; " + _REMEDY) from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: header is a JSON {type(header).__name__}, expected an object; the file is not safetensors.")
    data_start = 8 + n
    data_len = file_size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointFormatError(f"{path}: __metadata__ must map strings to strings; the file is corrupt; " + _REMEDY)
    entries = []
    for name, entry in header.items():
        entries.append(_parse_entry(path, name, entry, data_start))
    entries.sort(key=lambda t: (t.start, t.end))
    expected = data_start
    for info in entries:
        if info.start < expected:
            raise CheckpointFormatError(
                f"{path}: tensor {info.name!r} (bytes {info.start - data_start}..{info.end - data_start}) overlaps the tensor "
                "before it; the file is corrupt. Re-export it."
            )
        if info.start > expected:
            raise CheckpointFormatError(
                f"{path}: {info.start - expected} unaccounted bytes before tensor {info.name!r}; offsets must be contiguous. "
                "The file is corrupt; re-export it."
            )
        expected = info.end
    if expected - data_start > data_len:
        raise CheckpointFormatError(
            f"{path}: header describes {expected - data_start} bytes of tensor data but the file holds {data_len}; "
            "the file is truncated. Download it again."
        )
    if expected - data_start < data_len:
        raise CheckpointFormatError(
            f"{path}: {data_len - (expected - data_start)} trailing bytes after the last tensor; the file is corrupt "
            "or was appended to. Re-export or download it again."
        )
    return FileHeader(path, n, data_start, file_size, dict(metadata), {t.name: t for t in entries})


def _parse_entry(path: Path, name: str, entry: Any, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointFormatError(f"{path}: tensor {name!r} lacks dtype/shape/data_offsets in the header; the file is corrupt; " + _REMEDY)
    dtype = entry["dtype"]
    if dtype not in DTYPES:
        raise CheckpointFormatError(
            f"{path}: tensor {name!r} has unknown dtype {dtype!r}; surgeon reads {', '.join(DTYPES)}. "
            "Convert the checkpoint with a newer safetensors first."
        )
    shape = entry["shape"]
    offsets = entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointFormatError(f"{path}: tensor {name!r} has invalid shape {shape!r}; the file is corrupt; " + _REMEDY)
    if not (
        isinstance(offsets, list) and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise CheckpointFormatError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}; the file is corrupt; " + _REMEDY)
    nbytes = math.prod(shape) * DTYPES[dtype][1]
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointFormatError(
            f"{path}: tensor {name!r} is {dtype}{list(shape)} = {nbytes} bytes but its byte span is "
            f"{offsets[1] - offsets[0]} bytes; the file is corrupt. Re-export it."
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + offsets[0], data_start + offsets[1])


def build_header(specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """Serialize a header for tensors written in ``specs`` order.

    Returns the bytes to write before the data (8-byte prefix + JSON padded to
    a multiple of 8, as safetensors does) and each tensor's start offset
    relative to the data buffer.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    starts = []
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * DTYPES[dtype][1]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        starts.append(offset)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw, starts
