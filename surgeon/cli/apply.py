"""`surgeon apply BASE TV[:λ]... -o OUT`."""

from __future__ import annotations

import click

from surgeon.cli.hub_options import hub_options, push_after, push_to_option
from surgeon.cli.common import emit_json, global_options, human_bytes, info, json_option, max_shard_size_option, overwrite_option
from surgeon.workflows.taskvec.apply import apply_task_vectors, describe_tasks


@click.command("apply")
@click.argument("base")
@click.argument("tasks", nargs=-1, required=True, metavar="TV[:λ]...")
@click.option("-o", "--output", "out", required=True, help="Output model folder (or a .safetensors file).")
@click.option("--dtype", default="auto", show_default=True,
              help="Output dtype: auto (each base tensor's own), fp32, fp16, bf16.")
@max_shard_size_option
@overwrite_option
@hub_options
@push_to_option
@json_option
@global_options
def command(base: str, tasks: tuple[str, ...], out: str, dtype: str, max_shard_size: str, overwrite: bool,
            push_to: str | None, private: bool, as_json: bool) -> None:
    """Task arithmetic: θ = θ_base + Σ λ_i·τ_i, streamed, one rounding.

    Each TV is a task vector written by `surgeon diff -o`, optionally
    followed by :λ (default 1; negative λ subtracts a task, λ = 0 drops
    it). Touched tensors are summed in float32 and rounded once to the base
    dtype (or --dtype); all others are copied byte for byte. Config and
    tokenizer files come from BASE.

    \b
    Example:
      surgeon diff ./math-tuned ./base -o ./tau-math
      surgeon diff ./code-tuned ./base -o ./tau-code
      surgeon apply ./base ./tau-math:0.7 ./tau-code:0.5 -o ./merged
      surgeon apply ./base ./tau-toxic:-1 -o ./detoxed
    """
    report = apply_task_vectors(base, list(tasks), out, dtype=dtype, max_shard_size=max_shard_size,
                                overwrite=overwrite)
    pushed = push_after(out, push_to, private=private, as_json=as_json)
    if as_json:
        emit_json("apply", {**report.to_dict(), "push": pushed.to_dict() if pushed else None})
        return
    info(f"wrote {report.output} = base {describe_tasks(report)}: {report.tensors} tensors "
         f"({report.computed} computed, {report.copied} copied, {report.cast} cast), "
         f"{human_bytes(report.bytes_written)} in {len(report.shards)} file(s)")
