"""`surgeon scale-intruders TUNED --base BASE --lambda L -o OUT`."""

from __future__ import annotations

import click

from surgeon.cli.hub_options import hub_options, push_after, push_to_option
from surgeon.cli.common import emit_json, global_options, human_bytes, info, json_option, max_shard_size_option, overwrite_option, table
from surgeon.cli.intruders import spectral_options
from surgeon.cli.lazy import gc_paused
from surgeon.cli.parallel import distributed_command
from surgeon.parallel.world import World

_SHOW_ROWS = 30


@click.command("scale-intruders")
@click.argument("tuned", nargs=-1)
@spectral_options
@click.option("--lambda", "lam", required=True, type=float,
              help="New singular value of each intruder, as a multiple of the old one "
                   "(0 removes it, 1 changes nothing).")
@click.option("-o", "--output", "out", required=True, help="Output folder (or a .safetensors file).")
@click.option("--only-top", "only_top", default=None, type=int, metavar="N",
              help="Scale only the N highest-ranking intruders of each matrix.")
@click.option("--as-adapter", "as_adapter", is_flag=True,
              help="TUNED is BASE + a LoRA: write a PEFT LoRA adapter whose merge onto BASE is the repaired model.")
@click.option("--sequence-from", "sequence_from", default=None, type=int, metavar="STAGE",
              help="The TUNED are the stages of one continual run, in order: rescale only the last stage's "
                   "intruders born at STAGE or later (1 = the first TUNED).")
@click.option("--match", default=0.9, show_default=True, type=float,
              help="With --sequence-from: |cos| of two stages' singular vectors at which an intruder persists.")
@click.option("--html", "html", default=None, metavar="FILE",
              help="Write a report page: the model before and after (the output analysed again), every change.")
@max_shard_size_option
@overwrite_option
@hub_options
@push_to_option
@json_option
@global_options
@distributed_command
def command(tuned: tuple[str, ...], base: str, adapter: str | None, epsilon: float, top_k: int, targets: str, side: str,
            device: str, cache: str | None, no_cache: bool, method: str, lam: float, out: str, only_top: int | None,
            as_adapter: bool, sequence_from: int | None, match: float, html: str | None, max_shard_size: str,
            overwrite: bool,
            push_to: str | None, private: bool, as_json: bool, world: World) -> None:
    """Rescale intruder dimensions and write the repaired checkpoint.

    Each intruder j of a matrix (found as by `surgeon intruders`) gets its singular
    value σ_j replaced by λσ_j: W' = W_t + (λ − 1)·Σ σ_j u_j v_jᵀ, computed in float64
    and rounded once; every other singular value and every matrix without
    intruders is unchanged (copied byte for byte). TUNED is a checkpoint or a PEFT
    adapter folder (BASE + adapter). With --as-adapter the repair is written as a
    LoRA adapter for BASE (its rank grows by the number of intruders), so you can
    keep serving adapters. With --sequence-from STAGE, the TUNED are the stages of
    one continual run in order (as for `surgeon intruders --sequence`) and only the
    last stage's intruders born at STAGE or later are rescaled: the last stage is
    the model written.

    \b
    Example:
      surgeon scale-intruders ./full-ft --base ./Llama-3.2-1B --lambda 0.5 -o ./repaired
      surgeon scale-intruders ./my-lora --base ./Llama-3.2-1B --lambda 0 --as-adapter -o ./my-lora-fixed
      surgeon scale-intruders ./s1 ./s2 ./s3 --base ./bert --sequence-from 2 --lambda 0 -o ./s3-fixed --html r.html
      surgeon scale-intruders ./full-ft --base ./Llama-3.2-1B --lambda 0.5 -o ./repaired --nproc 2
    """
    with gc_paused():
        from surgeon.workflows.spectral.entry import run_scale_intruders
        from surgeon.workflows.spectral.intruders import IntruderOptions

    run = run_scale_intruders(list(tuned), base, out, lam=lam, adapter=adapter, targets=targets, only_top=only_top,
                              as_adapter=as_adapter, device=device, cache=cache, use_cache=not no_cache,
                              max_shard_size=max_shard_size, overwrite=overwrite, sequence_from=sequence_from,
                              match=match, html=html, world=world,
                              options=IntruderOptions(epsilon=epsilon, top_k=top_k, side=side, method=method))
    report = run.report
    pushed = push_after(out, push_to, private=private, as_json=as_json) if world.is_main else None
    if as_json:
        emit_json("scale-intruders", {**run.to_dict(), "push": pushed.to_dict() if pushed else None})
        return
    if report.changes:
        table(["tensor", "ranks", "c_j", "σ before", "σ after", "‖ΔW‖"],
              [(c.name, ",".join(map(str, c.ranks)), " ".join(f"{x:.2f}" for x in c.cosines),
                " ".join(f"{x:.3g}" for x in c.sigma_before), " ".join(f"{x:.3g}" for x in c.sigma_after),
                f"{c.delta_norm:.3g}") for c in report.changes[:_SHOW_ROWS]])
        if len(report.changes) > _SHOW_ROWS:
            click.echo(f"... {len(report.changes) - _SHOW_ROWS} more (all of them: --json)")
    scaled = sum(len(c.ranks) for c in report.changes)
    what = "adapter" if report.as_adapter else "model"
    info(f"wrote {what} {report.output}: {scaled} intruders scaled by λ={report.lam:g} in {len(report.changes)} "
         f"matrices; {report.unchanged} matrices without intruders left as they were "
         f"({human_bytes(report.bytes_written)}, {report.seconds:.1f}s)")
    if run.sequence is not None:
        info(f"--sequence-from {run.sequence_from}: only intruders born at stage {run.sequence_from} or later "
             f"({sum(len(c.ranks) for c in report.changes)} of the last stage's {run.sequence.stages[-1].intruders})")
    if html:
        info(f"wrote {html}")
