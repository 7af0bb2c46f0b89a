"""`surgeon merge BASE ADAPTER[:WEIGHT]... -o OUT`."""

from __future__ import annotations

import click

from surgeon.cli.hub_options import hub_options, push_after, push_to_option
from surgeon.cli.parallel import distributed_command
from surgeon.parallel.world import World
from surgeon.cli.common import emit_json, global_options, human_bytes, info, json_option, max_shard_size_option, overwrite_option, table
from surgeon.workflows.merge.run import MergeDryRun, merge

_SHOW_WARNINGS = 5
_SHOW_ROWS = 10


@click.command("merge")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.option("-o", "--output", "out", required=True, help="Output folder (or a .safetensors file).")
@click.option("--dtype", default="auto", show_default=True,
              help="Output precision: auto (the base's dtype), fp32, fp16 or bf16. The arithmetic is float32 either way.")
@click.option("--device", default="auto", show_default=True, help="Where to compute: auto (cuda if available), cpu, cuda.")
@max_shard_size_option
@click.option("--precision-report", "precision_report", default=None, metavar="FILE",
              help="Write the per-tensor rounding report (JSON) to FILE.")
@click.option("--base-quant", "base_quant", type=click.Choice(["nf4", "fp4", "none"]), default=None,
              help="A QLoRA adapter's base: round the base weights through bitsandbytes' 4-bit NF4/FP4 "
                   "quantize-dequantize before merging (default: the adapter's recorded quantization config, if any).")
@click.option("--dry-run", "dry_run", is_flag=True,
              help="Print the plan (every tensor: what happens to it, by which route, bytes out) and write nothing.")
@overwrite_option
@hub_options
@push_to_option
@json_option
@global_options
@distributed_command
def command(base: str, adapters: tuple[str, ...], out: str, dtype: str, device: str, max_shard_size: str,
            precision_report: str | None, base_quant: str | None, dry_run: bool, overwrite: bool,
            push_to: str | None, private: bool, as_json: bool, world: World) -> None:
    """Merge PEFT adapters into BASE, streamed from the files, at a chosen precision.

    Each ADAPTER is a PEFT adapter folder (adapter_config.json +
    adapter_model.safetensors), optionally with a weight (ADAPTER:0.5); several
    adapters apply in order. Supported: LoRA (rsLoRA, rank/alpha patterns, Conv1D,
    embeddings, lora_bias, modules_to_save), DoRA, AdaLoRA, VeRA, IA3, LoHa, LoKr,
    HiRA. W' is computed in float32 and rounded once to the output dtype; tensors
    no adapter touches are copied byte for byte. The output is a complete model
    folder (config, tokenizer, shards, index) with provenance.

    \b
    Example:
      surgeon merge ./Llama-3.2-1B ./my-lora -o ./merged
      surgeon merge ./base ./math-lora:0.7 ./code-lora:0.3 -o ./merged --dtype fp32 \\
          --precision-report precision.json
      surgeon merge ./base ./my-lora -o ./merged --dry-run
      surgeon merge ./Llama-3.2-1B ./my-qlora -o ./merged --base-quant nf4
      torchrun --nnodes 2 --nproc-per-node 8 ... -m surgeon merge /shared/base /shared/lora -o /shared/merged
    """
    report = merge(base, list(adapters), out, dtype=dtype, device=device, max_shard_size=max_shard_size,
                   overwrite=overwrite, precision_report=precision_report, dry_run=dry_run, base_quant=base_quant,
                   world=world)
    if isinstance(report, MergeDryRun):
        _show_plan(report, as_json)
        return
    pushed = push_after(out, push_to, private=private, as_json=as_json) if world.is_main else None
    if as_json:
        emit_json("merge", {**report.to_dict(), "push": pushed.to_dict() if pushed else None})
        return
    info(f"wrote {report.output}: {report.merged} merged, {report.replaced} replaced, {report.cast_only} cast only, "
         f"{report.copied} copied unchanged; {human_bytes(report.bytes_written)} in {len(report.shards)} file(s), "
         f"{report.seconds:.1f}s on {report.device}")
    for note in report.notes:
        info(f"Note: {note}")
    merged = sorted((e for e in report.entries if e.action != "cast only"), key=lambda e: -e.lost_fraction)
    if merged:
        click.echo(f"{len(merged)} tensors changed; largest share of ΔW lost to rounding first:")
        table(["tensor", "adapters", "dtype", "elements changed", "ΔW lost"],
              [(e.name, e.operations, e.dtype, f"{e.changed:,}/{e.numel:,}", f"{e.lost_fraction:.2%}")
               for e in merged[:_SHOW_ROWS]])
        if len(merged) > _SHOW_ROWS:
            click.echo(f"... {len(merged) - _SHOW_ROWS} more (all of them: --precision-report FILE or --json)")
    for warning in report.warnings[:_SHOW_WARNINGS]:
        click.echo(f"Warning: {warning}", err=True)
    if len(report.warnings) > _SHOW_WARNINGS:
        click.echo(f"Warning: {len(report.warnings) - _SHOW_WARNINGS} more tensors lose most of their change to "
                   "rounding; see --precision-report.", err=True)


def _show_plan(plan: MergeDryRun, as_json: bool) -> None:
    if as_json:
        emit_json("merge", plan.to_dict())
        return
    routes = plan.routes
    counts = routes.to_dict()["routes"]
    info(f"plan for {plan.output} (nothing written): {len(routes.tensors)} tensors, "
         f"{human_bytes(routes.bytes_out)} out, on {routes.device} ({routes.engine} engine); "
         + ", ".join(f"{n} {route}" for route, n in sorted(counts.items())))
    table(["tensor", "action", "route", "adapters", "dtype", "bytes out"],
          [(t.name, t.action, t.route, t.operations, t.dtype, human_bytes(t.nbytes)) for t in routes.tensors])
