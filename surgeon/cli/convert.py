"""`surgeon convert SRC -o OUT`."""

from __future__ import annotations

import click

from surgeon.cli.common import allow_non_finite_option, emit_json, global_options, human_bytes, info, json_option, max_shard_size_option, overwrite_option, table
from surgeon.workflows.convert import ConvertPlan, convert_checkpoint, plan_convert


@click.command("convert")
@click.argument("source")
@click.option("-o", "--output", "out", required=True, help="Output folder (or a .safetensors file).")
@click.option("--dtype", default="auto", show_default=True, help="Cast floating tensors: auto (keep), fp32, fp16, bf16.")
@max_shard_size_option
@overwrite_option
@allow_non_finite_option
@click.option("--dry-run", is_flag=True, help="Print the plan (every tensor: copied or cast, bytes, shard) and write nothing.")
@json_option
@global_options
def command(source: str, out: str, dtype: str, max_shard_size: str, overwrite: bool, dry_run: bool,
            as_json: bool) -> None:
    """Stream a checkpoint into a new one: reshard it, or cast it once.

    Tensors that are not cast are copied byte for byte. Config and tokenizer
    files come along (config.json names the new dtype after a cast);
    provenance is recorded. --dry-run shows what would happen to every tensor.

    \b
    Example:
      surgeon convert ./model -o ./model-resharded --max-shard-size 2GB
      surgeon convert ./model -o ./model-bf16 --dtype bf16 --dry-run
    """
    if dry_run:
        plan = plan_convert(source, out, dtype=dtype, max_shard_size=max_shard_size)
        if as_json:
            emit_json("convert", plan.to_dict())
        else:
            _show_plan(plan)
        return
    report = convert_checkpoint(source, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
    if as_json:
        emit_json("convert", report.to_dict())
        return
    info(f"wrote {report.output}: {report.tensors} tensors ({report.copied} copied, {report.cast} cast), "
         f"{human_bytes(report.bytes_written)} in {len(report.shards)} file(s)")


def _show_plan(plan: ConvertPlan) -> None:
    table(["tensor", "what happens", "shape", "bytes out", "shard"],
          [(s.name, s.describe(), "×".join(map(str, s.shape)) or "scalar", human_bytes(s.nbytes), s.shard)
           for s in plan.steps])
    sides = [*plan.copied_files, *(f"{name} (rewritten: dtype {plan.dtype})" for name, _ in plan.rewritten_files)]
    click.echo(f"dry run: {plan.output} would get {len(plan.steps)} tensors ({plan.copied} copied byte for byte, "
               f"{plan.cast} cast), {human_bytes(plan.bytes_out)} in {len(plan.shards)} file(s)"
               f"{'; side files: ' + ', '.join(sides) if sides else ''}. Nothing was written.")
