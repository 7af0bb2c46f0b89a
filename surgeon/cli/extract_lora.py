"""`surgeon extract-lora TUNED BASE (-r R | --energy F) -o ADAPTER`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from surgeon.cli.common import emit_json, global_options, human_count, info, json_option, overwrite_option, table
from surgeon.cli.lazy import gc_paused
from surgeon.cli.parallel import distributed_command
from surgeon.parallel.world import World

if TYPE_CHECKING:
    from surgeon.workflows.taskvec.extract_lora import ExtractReport


def _render(report: ExtractReport, show_all: bool) -> None:
    rows = [[m.module, m.kind, "x".join(map(str, m.shape)), m.rank, f"{m.energy:.6f}", f"{m.relative_error:.3g}"]
            for m in report.modules]
    if show_all or len(rows) <= 40:
        table(["module", "type", "τ shape", "rank", "energy kept", "rel. error"], rows)
        click.echo("")
    a = report.adapter
    ranks = sorted({m.rank for m in report.modules})
    click.echo(f"LoRA modules:     {len(report.modules)} (rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}..{ranks[-1]}'}"
               f", alpha = rank) from {report.module_types}" if ranks else "LoRA modules:     0")
    click.echo(f"max rel. error:   {report.max_relative_error:.3g}   (‖τ − B·A‖ / ‖τ‖)")
    if report.modules_to_save:
        click.echo(f"modules_to_save:  {len(report.modules_to_save)}: " + ", ".join(report.modules_to_save[:6])
                   + (" ..." if len(report.modules_to_save) > 6 else ""))
    for d in report.dropped:
        click.echo(f"not represented:  {d.name} ({d.reason})")
    click.echo(f"adapter params:   {human_count(a.parameters)} ({a.parameters:,})")


@click.command("extract-lora")
@click.argument("tuned")
@click.argument("base")
@click.option("-o", "--output", "out", required=True, help="Adapter folder to write.")
@click.option("-r", "--rank", type=int, default=None, help="Rank of every LoRA module.")
@click.option("--energy", type=float, default=None, help="Per module, the smallest rank holding this share of ‖τ‖².")
@click.option("--max-rank", type=int, default=None, help="Cap the rank chosen by --energy.")
@click.option("--targets", default=None, metavar="REGEX",
              help="Factor only modules whose name matches (re.search); default every changed Linear/Conv1D/Embedding.")
@click.option("--modules-to-save/--no-modules-to-save", "keep_modules", default=True, show_default=True,
              help="Store other changed modules (norms, biases, heads) whole, or only list them.")
@click.option("--dtype", default="fp32", show_default=True, help="dtype of the LoRA factors: fp32, bf16, fp16.")
@click.option("--device", default="auto", show_default=True, help="Where SVDs run: auto, cpu, cuda.")
@click.option("--exact", is_flag=True,
              help="Full float64 decomposition of every τ (default: randomised SVD, exact where its bounds do not "
                   "decide the rank; same error within 1% of the optimal truncation).")
@click.option("--tensors", "show_all", is_flag=True, help="List every module even when there are many.")
@overwrite_option
@json_option
@global_options
@distributed_command
def command(tuned: str, base: str, out: str, rank: int | None, energy: float | None, max_rank: int | None,
            targets: str | None, keep_modules: bool, dtype: str, device: str, exact: bool, show_all: bool,
            overwrite: bool, as_json: bool, world: World) -> None:
    """A PEFT LoRA adapter from the task vector τ = θ_tuned − θ_base, by truncated SVD.

    Each changed matrix τ = U·S·Vᵀ gives B = U_k·√S_k and A = √S_k·V_kᵀ with
    alpha = k, so PeftModel.from_pretrained(base, ADAPTER) reproduces TUNED up
    to the truncation (reported per matrix as ‖τ − B·A‖/‖τ‖). Other changed
    tensors go to modules_to_save or are listed. Tensors that differ only by
    rounding are ignored.

    \b
    Example:
      surgeon extract-lora ./llama-tuned ./llama-base -r 16 -o ./extracted-lora
      surgeon extract-lora ./llama-tuned ./llama-base --energy 0.9 --max-rank 64 \\
          --targets 'proj$' -o ./extracted-lora
      surgeon extract-lora ./llama-tuned ./llama-base -r 16 -o ./extracted-lora --nproc 2
    """
    with gc_paused():
        from surgeon.workflows.taskvec.extract_lora import extract_lora

    report = extract_lora(tuned, base, out, rank=rank, energy=energy, max_rank=max_rank, targets=targets,
                          modules_to_save=keep_modules, dtype=dtype, device=device, overwrite=overwrite,
                          exact=exact, world=world)
    if as_json:
        emit_json("extract-lora", report.to_dict())
        return
    _render(report, show_all)
    info(f"wrote {report.output}")
