"""Layout planning for a checkpoint about to be written: which tensor goes to which shard, under
which file name, behind which header, and how many bytes the whole output takes.

Pure planning over names, dtypes and shapes (no file is touched), so every header is known before
the first byte is written and the disk space needed can be checked up front.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import CheckpointFormatError, OutputError
from surgeon.io.format import DTYPES, build_header

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000


@dataclass(frozen=True)
class TensorSpec:
    """What will be written: a tensor's name, safetensors dtype string and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2*2**30, '300MB', '1000' (bytes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise OutputError(f"shard size {text!r} is not a size; write it like 5GB, 500MB or 2GiB.")
    number, unit = float(m.group(1)), m.group(2).rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(number * scale)
    if size <= 0:
        raise OutputError(f"shard size {text!r} must be positive; write it like 5GB, 500MB or 2GiB.")
    return size


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split tensors (in order) into shards of at most ``max_shard_size`` data bytes.

    A tensor larger than the budget gets a shard of its own, as in transformers.
    """
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int, prefix: str = "model") -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


@dataclass(frozen=True)
class ShardLayout:
    """Every shard of an output: its tensors (in write order), file name and header bytes."""

    out: Path
    specs: tuple[TensorSpec, ...]
    shards: tuple[tuple[TensorSpec, ...], ...]
    names: tuple[str, ...]
    headers: tuple[bytes, ...]
    metadata: dict[str, str]
    prefix: str
    single_file: bool

    @property
    def data_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    @property
    def total_bytes(self) -> int:
        """Bytes of every shard file on disk (headers included), without sidecars."""
        return self.data_bytes + sum(len(h) for h in self.headers)

    def index_text(self) -> str | None:
        """The ``*.safetensors.index.json`` text of a sharded folder; None when one file suffices."""
        if self.single_file or len(self.names) == 1:
            return None
        index = {
            "metadata": {"total_size": self.data_bytes,
                         **{k: v for k, v in self.metadata.items() if k != "format"}},
            "weight_map": {s.name: self.names[i] for i, shard in enumerate(self.shards) for s in shard},
        }
        return json.dumps(index, indent=2) + "\n"

    @property
    def index_name(self) -> str:
        return f"{self.prefix}.safetensors.index.json"


def plan_layout(out: Path, specs: Sequence[TensorSpec], *, max_shard_size: int | str, metadata: dict[str, str],
                prefix: str = "model") -> ShardLayout:
    """Plan where every tensor of ``specs`` goes; a ``.safetensors`` ``out`` is one file, else a folder."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CheckpointFormatError(f"{out}: tensor {dup!r} would be written twice.")
    single_file = out.suffix == ".safetensors"
    budget = parse_size(max_shard_size)
    shards = [list(specs)] if single_file else plan_shards(specs, budget)
    files = [out.name] if single_file else shard_names(len(shards), prefix)
    headers = tuple(build_header([(s.name, s.dtype, tuple(s.shape)) for s in shard], metadata)[0] for shard in shards)
    return ShardLayout(out=out, specs=tuple(specs), shards=tuple(tuple(s) for s in shards), names=tuple(files),
                       headers=headers, metadata=dict(metadata), prefix=prefix, single_file=single_file)


@dataclass(frozen=True)
class Place:
    """Where a tensor's bytes go: shard ``shard`` at absolute file offset ``offset``, ``nbytes`` long."""

    shard: int
    offset: int
    nbytes: int


def places(layout: ShardLayout) -> dict[str, Place]:
    """Every planned tensor's place (data follow each shard's header, in the shard's order)."""
    out: dict[str, Place] = {}
    for idx, (shard, header) in enumerate(zip(layout.shards, layout.headers)):
        offset = len(header)
        for spec in shard:
            out[spec.name] = Place(idx, offset, spec.nbytes)
            offset += spec.nbytes
    return out


def shard_lengths(layout: ShardLayout) -> list[int]:
    return [len(h) + sum(s.nbytes for s in shard) for shard, h in zip(layout.shards, layout.headers)]
