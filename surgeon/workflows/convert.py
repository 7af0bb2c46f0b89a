"""`surgeon convert`: stream a checkpoint into a new one (reshard, optionally cast).

Unchanged tensors are copied byte for byte (in-kernel where the filesystem
allows); a cast rounds once from the stored values.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from surgeon.errors import OptionError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import DTYPE_ALIASES, torch_dtype
from surgeon.io.resolve import resolve_path
from surgeon.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec
from surgeon.progress import progress
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text, safetensors_metadata

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

@dataclass(frozen=True)
class ConvertReport:
    source: str
    output: str
    tensors: int
    copied: int
    cast: int
    bytes_written: int
    shards: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

def parse_dtype(name: str | None) -> str | None:
    """'bf16' -> 'BF16'; None/'auto' -> None. Raises on unknown names."""
    if name is None or name.lower() == "auto":
        return None
    key = DTYPE_ALIASES.get(name.lower(), name.upper())
    if key not in FLOAT_DTYPES:
        raise OptionError(f"--dtype {name!r} is not a float dtype surgeon writes; use auto, fp32, fp16 or bf16.")
    return key

def convert_checkpoint(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> ConvertReport:
    """Copy ``source`` to ``out``, resharding and casting floating tensors to ``dtype`` if given."""
    target = parse_dtype(dtype)
    src_path = resolve_path(source)
    with Checkpoint.open(src_path) as ckpt:
        plan = []
        for name, info in ckpt.tensors.items():
            new = target if (target and info.dtype in FLOAT_DTYPES and info.dtype != target) else None
            plan.append((name, new))
        specs = [TensorSpec(n, new or ckpt.info(n).dtype, ckpt.info(n).shape) for n, new in plan]
        record = provenance("convert", {"dtype": target or "auto", "max_shard_size": str(max_shard_size)},
                            inputs={"source": str(source)})
        with CheckpointWriter(
            out, specs, inputs=[src_path], max_shard_size=max_shard_size, overwrite=overwrite,
            metadata=safetensors_metadata(record), extra_files=ckpt.extra_files(),
            extra_texts={PROVENANCE_FILE: provenance_file_text(record)},
        ) as writer:
            for name, new in progress(plan, total=len(plan), desc="convert"):
                if new is None:
                    writer.copy_from(ckpt, name)
                else:
                    writer.write(name, ckpt.get(name).to(torch_dtype(new)))
        cast = sum(1 for _, new in plan if new)
        return ConvertReport(str(source), str(out), len(plan), len(plan) - cast, cast,
                             sum(s.nbytes for s in specs), writer.shard_files)
