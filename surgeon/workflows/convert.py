"""`surgeon convert`: stream a checkpoint into a new one (reshard, optionally cast).

First a :class:`ConvertPlan` is made from the headers alone: every tensor, whether it is copied
byte for byte or cast (and from which dtype to which), its bytes out and the shard it lands in,
plus the side files (config.json rewritten to name the new dtype). ``--dry-run`` prints that plan;
a real run executes exactly it: the writer is given the plan's tensors in the plan's order, and
each tensor is copied (in-kernel where the filesystem allows) or cast once from its stored values.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from surgeon.errors import CheckpointFormatError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import FLOAT_DTYPES, parse_dtype, torch_dtype
from surgeon.io.model_config import side_files
from surgeon.io.resolve import resolve_path
from surgeon.io.writer import DEFAULT_MAX_SHARD_SIZE, CheckpointWriter, TensorSpec, parse_size, plan_shards, shard_names
from surgeon.progress import progress
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text, safetensors_metadata

__all__ = ["FLOAT_DTYPES", "ConvertPlan", "ConvertReport", "TensorStep", "convert_checkpoint", "execute_convert",
           "parse_dtype", "plan_convert"]


@dataclass(frozen=True)
class TensorStep:
    """What happens to one tensor: ``action`` "copy" (byte for byte) or "cast" (from ``dtype`` to
    ``out_dtype``, rounded once), the bytes it takes in the output and the shard file it goes to."""

    name: str
    action: str
    dtype: str
    out_dtype: str
    shape: tuple[int, ...]
    nbytes: int
    shard: str

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.out_dtype, self.shape)

    def describe(self) -> str:
        return "copied byte for byte" if self.action == "copy" else f"cast from {self.dtype} to {self.out_dtype}"


@dataclass(frozen=True)
class ConvertPlan:
    """Everything a conversion will write, decided before a byte of tensor data is read."""

    source: str
    output: str
    dtype: str  # the --dtype asked for ("auto": every tensor keeps its own)
    max_shard_size: str
    steps: tuple[TensorStep, ...]
    shards: tuple[str, ...]
    copied_files: tuple[str, ...]  # side files copied as they are
    rewritten_files: tuple[tuple[str, str], ...]  # (name, text) written anew: config.json naming the new dtype

    @property
    def copied(self) -> int:
        return sum(1 for s in self.steps if s.action == "copy")

    @property
    def cast(self) -> int:
        return sum(1 for s in self.steps if s.action == "cast")

    @property
    def bytes_out(self) -> int:
        return sum(s.nbytes for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["steps"] = [{**asdict(s), "shape": list(s.shape), "what": s.describe()} for s in self.steps]
        body["rewritten_files"] = [name for name, _ in self.rewritten_files]
        return {"dry_run": True, **body, "tensors": len(self.steps), "copied": self.copied, "cast": self.cast,
                "bytes_written": self.bytes_out}


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


def _make_plan(ckpt: Checkpoint, source: str, out: str, target: str | None, max_shard_size: int | str) -> ConvertPlan:
    kept = []
    for name, info in ckpt.tensors.items():
        new = target if (target and info.dtype in FLOAT_DTYPES) else info.dtype
        kept.append((name, info.dtype, new, tuple(info.shape)))
    specs = [TensorSpec(name, new, shape) for name, _, new, shape in kept]
    if Path(out).suffix == ".safetensors":  # one file, as the writer makes it
        groups, files = [specs], [Path(out).name]
    else:
        groups = plan_shards(specs, parse_size(max_shard_size))
        files = shard_names(len(groups))
    shard_of = {spec.name: files[i] for i, group in enumerate(groups) for spec in group}
    steps = tuple(TensorStep(name, "copy" if new == old else "cast", old, new, shape, spec.nbytes, shard_of[name])
                  for (name, old, new, shape), spec in zip(kept, specs))
    copy, texts = side_files(ckpt, target)
    return ConvertPlan(source, out, target or "auto", str(max_shard_size), steps, tuple(files),
                       tuple(p.name for p in copy), tuple(texts.items()))


def plan_convert(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> ConvertPlan:
    """What :func:`convert_checkpoint` would write, from the headers alone; nothing is written or created."""
    target = parse_dtype(dtype)
    parse_size(max_shard_size)  # a bad size is refused by the plan, not first by the writer
    with Checkpoint.open(resolve_path(source)) as ckpt:
        return _make_plan(ckpt, os.fspath(source), os.fspath(out), target, max_shard_size)


def convert_checkpoint(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> ConvertReport:
    """Copy ``source`` to ``out``, resharding and casting floating tensors to ``dtype`` if given."""
    return execute_convert(plan_convert(source, out, dtype=dtype, max_shard_size=max_shard_size), overwrite=overwrite)


def execute_convert(plan: ConvertPlan, *, overwrite: bool = False) -> ConvertReport:
    """Write exactly ``plan``: its tensors in its order, each copied or cast as it says, its side files."""
    src_path = resolve_path(plan.source)
    with Checkpoint.open(src_path) as ckpt:
        _check_unchanged(ckpt, plan)
        record = provenance("convert", {"dtype": plan.dtype, "max_shard_size": plan.max_shard_size},
                            inputs={"source": plan.source})
        copy = [p for p in ckpt.extra_files() if p.name in plan.copied_files]
        with CheckpointWriter(
            plan.output, [s.spec for s in plan.steps], inputs=[src_path], max_shard_size=plan.max_shard_size,
            overwrite=overwrite, metadata=safetensors_metadata(record), extra_files=copy,
            extra_texts={**dict(plan.rewritten_files), PROVENANCE_FILE: provenance_file_text(record)},
        ) as writer:
            for step in progress(plan.steps, total=len(plan.steps), desc="convert"):
                if step.action == "copy":
                    writer.copy_from(ckpt, step.name)
                else:
                    writer.write(step.name, ckpt.get(step.name).to(torch_dtype(step.out_dtype)))
    return ConvertReport(plan.source, plan.output, len(plan.steps), plan.copied, plan.cast, plan.bytes_out,
                         writer.shard_files)


def _check_unchanged(ckpt: Checkpoint, plan: ConvertPlan) -> None:
    """The source must still hold what the plan was made from (same names, dtypes and shapes)."""
    planned = {s.name: (s.dtype, s.shape) for s in plan.steps}
    found = {name: (info.dtype, tuple(info.shape)) for name, info in ckpt.tensors.items()}
    if planned != found:
        name = next(n for n in sorted(planned.keys() | found.keys()) if planned.get(n) != found.get(n))

        def show(entry: tuple[str, tuple[int, ...]] | None) -> str:
            return "absent" if entry is None else f"{entry[0]} {list(entry[1])}"

        raise CheckpointFormatError(
            f"{plan.source}: tensor {name!r} is {show(found.get(name))} now but was {show(planned.get(name))} "
            "when the conversion was planned; the source changed. Plan the conversion again."
        )
