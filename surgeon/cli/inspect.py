"""`surgeon inspect PATH`."""

from __future__ import annotations

import click

from surgeon.cli.common import emit_json, global_options, human_bytes, human_count, json_option, table
from surgeon.workflows.inspect import ROUTE_NAMES, inspect_checkpoint, merge_support, merge_support_text


@click.command("inspect")
@click.argument("path", required=False)
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor with dtype, shape and file.")
@click.option("--merge-support", "show_support", is_flag=True,
              help="List every adapter type `surgeon merge` merges, and how (no PATH needed).")
@json_option
@global_options
def command(path: str | None, show_tensors: bool, show_support: bool, as_json: bool) -> None:
    """Show what a checkpoint or PEFT adapter holds, from its headers alone.

    PATH is a .safetensors file, a model folder (single or sharded) or a PEFT
    adapter folder. Nothing but headers and config files is read. For an
    adapter it also says how `surgeon merge` merges it.

    \b
    Example:
      surgeon inspect ./Llama-3.2-1B --tensors
      surgeon inspect ./my-lora --json
      surgeon inspect --merge-support
    """
    if show_support:
        if as_json:
            emit_json("inspect", {"merge_support": merge_support()})
        else:
            click.echo(merge_support_text())
        return
    if path is None:
        raise click.UsageError("give a PATH to inspect (or --merge-support).")
    report = inspect_checkpoint(path)
    if as_json:
        emit_json("inspect", report.to_dict())
        return
    click.echo(f"{report.path}: {report.format}")
    if report.architecture or report.model_type:
        click.echo(f"  architecture: {report.architecture or '?'} ({report.model_type or '?'})")
    click.echo(f"  files:        {len(report.files)} ({human_bytes(sum(f.bytes for f in report.files))})")
    click.echo(f"  tensors:      {report.tensor_count}")
    click.echo(f"  parameters:   {report.parameter_count:,} ({human_count(report.parameter_count)})")
    click.echo(f"  tensor bytes: {report.bytes:,} ({human_bytes(report.bytes)})")
    click.echo("  dtypes:       " + ", ".join(f"{k} x{v.tensors} ({human_count(v.parameters)} params)" for k, v in report.dtypes.items()))
    if report.metadata.get("surgeon_command"):
        click.echo(f"  made by:      surgeon {report.metadata.get('surgeon_version')} {report.metadata['surgeon_command']}")
    a = report.adapter
    if a is not None:
        click.echo(f"  adapter:      {a.peft_type} r={a.r} alpha={a.alpha}")
        click.echo(f"  merge:        {ROUTE_NAMES.get(a.merge_route, a.merge_route)}")
        click.echo(f"  targets:      {a.target_modules}")
        if a.modules_to_save:
            click.echo(f"  modules_to_save: {a.modules_to_save}")
        if a.base_model:
            click.echo(f"  base model:   {a.base_model}")
        for k, v in a.extra.items():
            if v not in (None, False, {}, "none"):
                click.echo(f"  {k}: {v}")
    if show_tensors:
        click.echo("")
        table(["tensor", "dtype", "shape", "file"], [(t.name, t.dtype, "x".join(map(str, t.shape)) or "scalar", t.file) for t in report.tensors])
