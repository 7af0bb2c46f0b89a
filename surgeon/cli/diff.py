"""`surgeon diff TUNED BASE [-o OUT] [--adapter ADAPTER]`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from surgeon.cli.common import emit_json, global_options, human_count, info, json_option, overwrite_option, table
from surgeon.cli.lazy import gc_paused
from surgeon.cli.parallel import distributed_command
from surgeon.parallel.world import World

if TYPE_CHECKING:
    from surgeon.workflows.taskvec.adapter_check import AdapterCheck
    from surgeon.workflows.taskvec.diff import DiffReport, TensorDiff


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"  # None: not computed (not needed to decide)


def _row(d: TensorDiff) -> list[str]:
    r = d.rank
    at_least = "" if r is None or r.numerical_rank_exact else "≥"
    ranks = "-" if r is None else f"{at_least}{r.numerical_rank} / {r.stable_rank:.1f} / {r.rank_90} / {r.rank_99}"
    return [d.name, d.status, d.dtype, "x".join(map(str, d.shape)), _num(d.norm), _num(d.relative_norm),
            _num(d.max_abs), _num(d.max_ulps), ranks]


def _render(report: DiffReport, show_all: bool) -> None:
    s = report.summary
    rows = [_row(d) for d in report.tensors if show_all or d.status == "changed"]
    if rows:
        table(["tensor", "status", "dtype", "shape", "‖τ‖", "‖τ‖/‖θ‖", "max|τ|", "max ulps",
               "rank num / stable / 90% / 99%"], rows)
        click.echo("")
    for label, c in (("identical", s.identical), ("rounding only", s.rounding_only), ("changed", s.changed)):
        click.echo(f"{label + ':':15}{c.tensors:6d} tensors  {human_count(c.parameters):>9} params")
    judged = "each tuned tensor's stored dtype" if report.rounding_dtype == "auto" else report.rounding_dtype
    click.echo(f"{'‖τ‖:':15}{s.norm:.6g}   (rounding judged in {judged})")
    for label, names in (("only in tuned", s.only_in_tuned), ("only in base", s.only_in_base)):
        if names:
            click.echo(f"{label + ':':15}{len(names):6d} tensors  " + ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
    for m in s.shape_mismatches:
        click.echo(f"shape differs:  {m.name}: tuned {m.tuned_shape}, base {m.base_shape}")
    if s.non_float:
        click.echo(f"{'non-float:':15}{len(s.non_float):6d} tensors compared, never written to a task vector")
    if report.adapter_check is not None:
        _render_check(report.adapter_check)


def _render_check(c: AdapterCheck) -> None:
    click.echo("")
    table(["adapter target", "τ status", "cosine", "max|τ−ΔW|", "rel. error", "max ulps", "verdict"],
          [[t.name, t.status, f"{t.cosine:.8f}", _num(t.max_abs_diff), _num(t.relative_error), _num(t.max_ulps),
            "ok" if t.equivalent else "DIFFERS"] for t in c.targets])
    click.echo("")
    for label, p in (("shared", c.shared), ("task vector only", c.task_vector_only), ("adapter only", c.adapter_only)):
        extra = ("  " + ", ".join(p.names[:5]) + (" ..." if len(p.names) > 5 else "")) if label != "shared" and p.names else ""
        click.echo(f"{label + ':':18}{p.tensors:6d} tensors  {human_count(p.parameters):>9} params{extra}")
    verdict = "EQUIVALENT" if c.equivalent else "NOT EQUIVALENT"
    click.echo(f"{c.adapter}: {verdict} (tolerance {c.tolerance:g}; max rel. error {_num(c.max_relative_error)}, "
               f"min cosine {c.min_cosine:.8f})")


@click.command("diff")
@click.argument("tuned")
@click.argument("base")
@click.option("-o", "--output", "out", default=None, help="Write the task vector τ (float32 safetensors) here.")
@click.option("--all", "all_tensors", is_flag=True, help="Write every float tensor to OUT, not only the changed ones.")
@click.option("--adapter", default=None, help="Check that τ equals this PEFT adapter's ΔW; exit 1 if not.")
@click.option("--tolerance", default=1e-4, show_default=True, type=float,
              help="With --adapter: largest ‖τ−ΔW‖/‖ΔW‖ still equivalent (a target within 2 ulps of the tuned "
                   "dtype passes too: an fp16/bf16 merge).")
@click.option("--strict", is_flag=True, help="Fail when keys or shapes differ instead of listing them.")
@click.option("--rounding-dtype", default="auto", show_default=True,
              help="Precision for 'rounding only': auto (each tuned tensor's stored dtype), fp16, bf16, fp32.")
@click.option("--no-rank", "no_rank", is_flag=True, help="Skip the SVD rank statistics (faster on big models).")
@click.option("--exact", "exact_ranks", is_flag=True,
              help="Rank statistics from every singular value (default: randomised SVD where its bounds decide; "
                   "a numerical rank inside rounding noise is then a lower bound, shown as ≥N).")
@click.option("--device", default="auto", show_default=True, help="Where SVDs run: auto, cpu, cuda, cuda:1.")
@click.option("--tensors", "show_all", is_flag=True, help="List every tensor, not only the changed ones.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest shard of OUT, e.g. 5GB.")
@overwrite_option
@json_option
@global_options
@click.pass_context
@distributed_command
def command(ctx: click.Context, tuned: str, base: str, out: str | None, all_tensors: bool, adapter: str | None,
            tolerance: float, strict: bool, rounding_dtype: str, no_rank: bool, exact_ranks: bool, device: str,
            show_all: bool,
            max_shard_size: str, overwrite: bool, as_json: bool, world: World) -> None:
    """Task vector τ = θ_tuned − θ_base, in float32, tensor by tensor.

    Each tensor is identical, rounding only (|τ| within half an ulp of the
    tuned tensor's stored dtype at θ_base: the artifacts of an fp16/bf16 cast
    or merge) or changed. Changed tensors get ‖τ‖, ‖τ‖/‖θ_base‖, max |τ| and,
    for matrices, numerical / stable rank and the ranks holding 90% and 99%
    of ‖τ‖² (a merged LoRA shows rank ≤ r). With -o, the changed tensors'
    τ (all of them with --all) are written as float32 safetensors with
    provenance. With --adapter, exit code 0 means the tuned model is the
    base plus that adapter, 1 that it is not.

    \b
    Example:
      surgeon diff ./llama-tuned ./llama-base -o ./tau
      surgeon diff ./llama-merged ./llama-base --adapter ./my-lora
      surgeon diff ./llama-tuned ./llama-base --json --nproc 2     # rank statistics on two processes
    """
    with gc_paused():
        from surgeon.workflows.taskvec.diff import diff_checkpoints

    report = diff_checkpoints(
        tuned, base, out, all_tensors=all_tensors, strict=strict, ranks=not no_rank, exact_ranks=exact_ranks,
        rounding_dtype=rounding_dtype, adapter=adapter, tolerance=tolerance, device=device,
        max_shard_size=max_shard_size, overwrite=overwrite, world=world,
    )
    if as_json:
        emit_json("diff", report.to_dict())
    else:
        _render(report, show_all)
        if report.output is not None:
            info(f"wrote {report.output}: τ of {len(report.written)} tensors (float32)")
    if report.adapter_check is not None and not report.adapter_check.equivalent:
        ctx.exit(1)
