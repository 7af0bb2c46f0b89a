"""`surgeon apply BASE INPUT[:λ]... -o OUT [--method M]`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from surgeon.cli.common import (
    allow_non_finite_option,
    emit_json,
    global_options,
    human_bytes,
    info,
    json_option,
    max_shard_size_option,
    overwrite_option,
    table,
)
from surgeon.cli.hub_options import hub_options, push_after, push_to_option
from surgeon.cli.lazy import gc_paused
from surgeon.cli.parallel import distributed_command
from surgeon.parallel.world import World
from surgeon.workflows.taskvec.method_specs import METHODS

if TYPE_CHECKING:
    from surgeon.workflows.taskvec.apply import ApplyReport


@click.command("apply")
@click.argument("base")
@click.argument("tasks", nargs=-1, required=True, metavar="INPUT[:λ]...")
@click.option("-o", "--output", "out", required=True, help="Output model folder (or a .safetensors file).")
@click.option("--method", default="task_arithmetic", show_default=True, type=click.Choice(list(METHODS)),
              help="How the task vectors combine (mergekit's methods and parameter names).")
@click.option("--density", type=float, default=1.0, show_default=True,
              help="Fraction of each task vector kept (ties, dare_*, breadcrumbs*, della*, magnitude_prune).")
@click.option("--epsilon", type=float, default=0.15, show_default=True,
              help="DELLA: keep probabilities span density ± epsilon by magnitude rank.")
@click.option("--gamma", type=float, default=0.01, show_default=True,
              help="Breadcrumbs: fraction of the largest values dropped as outliers.")
@click.option("--lambda-scale", type=float, default=1.0, show_default=True,
              help="Multiplies the combined task vector (mergekit's lambda).")
@click.option("--normalize/--no-normalize", default=None,
              help="Divide by the sum of weights (default: the method's, on for ties and della).")
@click.option("--rescale/--no-rescale", default=None,
              help="Rescale kept values to the task vector's L1 norm (default: on for dare_* and della*).")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
              help="Sign election of the *_ties methods and della: by summed values or by count.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of DARE/DELLA masks (same seed, same bytes, on any machine).")
@click.option("--t", "t", type=float, default=0.5, show_default=True, help="slerp: 0 gives BASE, 1 the INPUT.")
@click.option("--dtype", default="auto", show_default=True,
              help="Output dtype: auto (each base tensor's own), fp32, fp16, bf16.")
@click.option("--dry-run", is_flag=True, help="Print the plan (every tensor, what happens, bytes) and write nothing.")
@max_shard_size_option
@overwrite_option
@allow_non_finite_option
@hub_options
@push_to_option
@json_option
@global_options
@distributed_command
def command(base: str, tasks: tuple[str, ...], out: str, method: str, density: float, epsilon: float, gamma: float,
            lambda_scale: float, normalize: bool | None, rescale: bool | None, majority_sign: str, seed: int,
            t: float, dtype: str, dry_run: bool, max_shard_size: str, overwrite: bool, push_to: str | None,
            private: bool, as_json: bool, world: World) -> None:
    """Task arithmetic and model merging: θ = θ_base + combination of τ_i, streamed, one rounding.

    Each INPUT is a task vector written by `surgeon diff -o` or a fine-tune
    of BASE (τ = θ − θ_base is computed on the fly, nothing is written for
    it), optionally followed by :λ (its weight; default 1, negative
    subtracts, 0 drops it). --method picks mergekit's combination:
    task_arithmetic (Σ λ_i·τ_i), ties, dare_linear, dare_ties, breadcrumbs,
    breadcrumbs_ties, della, della_linear, magnitude_prune, model_stock
    (two or more fine-tunes) or slerp (BASE and one INPUT, --t). Touched
    tensors are computed in float32 and rounded once to the base dtype (or
    --dtype); all others are copied byte for byte. Config and tokenizer
    files come from BASE.

    \b
    Example:
      surgeon diff ./math-tuned ./base -o ./tau-math
      surgeon apply ./base ./tau-math:0.7 ./code-tuned:0.5 -o ./merged
      surgeon apply ./base ./math-tuned ./code-tuned --method ties --density 0.2 -o ./ties
      surgeon apply ./base ./math-tuned --method slerp --t 0.3 -o ./slerp --dry-run
      surgeon apply ./base ./math-tuned ./code-tuned --method ties -o ./ties --nproc 2
    """
    with gc_paused():
        from surgeon.workflows.taskvec.apply import apply_task_vectors, describe_tasks
        from surgeon.workflows.taskvec.methods import ApplyOptions

    options = ApplyOptions(method=method, density=density, epsilon=epsilon, gamma=gamma, lambda_scale=lambda_scale,
                           normalize=normalize, rescale=rescale, majority_sign=majority_sign, seed=seed, t=t)
    report = apply_task_vectors(base, list(tasks), out, options=options, dtype=dtype, max_shard_size=max_shard_size,
                                overwrite=overwrite, dry_run=dry_run, world=world)
    if dry_run:
        _print_plan(report, as_json)
        return
    pushed = push_after(out, push_to, private=private, as_json=as_json) if world.is_main else None
    if as_json:
        emit_json("apply", {**report.to_dict(), "push": pushed.to_dict() if pushed else None})
        return
    info(f"wrote {report.output} = base {describe_tasks(report)} ({report.method}): {report.tensors} tensors "
         f"({report.computed} computed, {report.copied} copied, {report.cast} cast), "
         f"{human_bytes(report.bytes_written)} in {len(report.shards)} file(s)")


def _print_plan(report: ApplyReport, as_json: bool) -> None:
    if as_json:
        emit_json("apply", report.to_dict())
        return
    names = [f"#{i} {t.path} ({k}, λ={t.weight:g})" for i, (t, k) in enumerate(zip(report.tasks, report.kinds))]
    rows = [(p.name, p.action, ",".join(f"#{i}" for i in p.inputs) or "-", p.dtype, human_bytes(p.bytes))
            for p in report.plan]
    click.echo(f"plan: {report.method} onto {report.base}; inputs: "
               + "; ".join(names))
    table(["tensor", "action", "inputs", "dtype", "bytes"], rows)
    click.echo(f"{report.tensors} tensors: {report.computed} merge, {report.copied} copy, {report.cast} cast; "
               f"{human_bytes(report.bytes_written)} would be written (nothing written: --dry-run)")
