"""`surgeon intruders TUNED --base BASE`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from surgeon.cli.common import emit_json, global_options, info, json_option, table
from surgeon.cli.lazy import gc_paused
from surgeon.ops.targets import DEFAULT_PRESET, PRESETS
from surgeon.cli.parallel import distributed_command
from surgeon.parallel.world import World
from surgeon.workflows.spectral.choices import SIDES

if TYPE_CHECKING:
    from surgeon.workflows.spectral.intruders import IntrudersReport
    from surgeon.workflows.spectral.multi import ManyReport
    from surgeon.workflows.spectral.sequence import SequenceReport

_SHOW_ROWS = 30


def spectral_options(func):  # type: ignore[no-untyped-def]
    """Options shared by `intruders` and `scale-intruders`."""
    for option in reversed([
        click.option("--base", "base", required=True, help="The base model TUNED was fine-tuned from."),
        click.option("--adapter", "adapter", default=None, metavar="ADAPTER",
                     help="A PEFT adapter: TUNED is then BASE (or TUNED) + ADAPTER, merged on the fly in memory."),
        click.option("--epsilon", default=0.5, show_default=True, type=float,
                     help="c_j below this makes u_j an intruder."),
        click.option("--top-k", "top_k", default=10, show_default=True, type=int,
                     help="Tuned singular vectors examined per matrix."),
        click.option("--targets", default=DEFAULT_PRESET, show_default=True, metavar="PRESET|REGEX",
                     help=f"Matrices: a preset ({', '.join(PRESETS)}) or a regex searched in tensor names."),
        click.option("--side", type=click.Choice(SIDES), default="left", show_default=True,
                     help="Singular vectors compared: left (the paper's), right, or both (an intruder on both sides)."),
        click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu or cuda."),
        click.option("--cache", "cache", default=None, metavar="DIR",
                     help="Base decompositions cache [default: $SURGEON_CACHE_DIR or ~/.cache/surgeon/svd]."),
        click.option("--no-cache", "no_cache", is_flag=True, help="Neither read nor write the base cache."),
        click.option("--method", type=click.Choice(["auto", "krylov", "dense"]), default="auto", show_default=True,
                     help="Top-k of W_t: block Krylov (checked, dense fallback), always dense, or auto."),
    ]):
        func = option(func)
    return func


@click.command("intruders")
@click.argument("tuned", nargs=-1)
@spectral_options
@click.option("--sequence", is_flag=True,
              help="The TUNED are stages of one continual run, in order: report new, persisting and vanished intruders.")
@click.option("--match", default=0.9, show_default=True, type=float,
              help="With --sequence: |cos| of two stages' singular vectors at which an intruder persists.")
@click.option("--plot", "plot", default=None, metavar="DIR",
              help="Write PNG figures to DIR (similarity matrices, counts per layer, ε sweep); needs surgeon[plot].")
@click.option("--plot-matrices", "plot_matrices", default=None, metavar="REGEX",
              help="Matrices drawn as similarity figures [default: the 4 with the most intruder energy].")
@click.option("--html", "html", default=None, metavar="FILE",
              help="Write a self-contained report page (cards, counts, ε sweep, heat-maps, spectra); needs surgeon[plot].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --html file (figures in --plot DIR are never replaced).")
@json_option
@global_options
@distributed_command
def command(tuned: tuple[str, ...], base: str, adapter: str | None, epsilon: float, top_k: int, targets: str,
            side: str, device: str, cache: str | None, no_cache: bool, method: str, sequence: bool, match: float,
            plot: str | None, plot_matrices: str | None, html: str | None, overwrite: bool, as_json: bool,
            world: World) -> None:
    """Find intruder dimensions: new high-ranking singular vectors a fine-tune introduced.

    For each of the top-k left singular vectors u_j of the tuned matrix W_t
    (nn.Linear orientation), c_j = max_i |u_jᵀu₀,i| over all singular vectors of
    the base W₀; u_j is an intruder when c_j < ε (arXiv 2410.21228, the authors'
    definition). TUNED is a fine-tuned checkpoint, or a PEFT adapter folder
    (meaning BASE + adapter, merged on the fly; nothing is written). Each base
    matrix is decomposed once and cached by content hash; the tuned side needs only
    its top-k. The random baseline is c_j of a random direction: when ε is near
    it, every direction looks like an intruder.

    Several TUNED (checkpoints and adapters, mixed) are reported side by side,
    each base matrix decomposed once for all; --json then has "models": [...], one
    one-model report per TUNED in order. With --sequence the TUNED are the stages
    of one continual run: per stage, intruders new, persisting from an earlier
    stage (|cos| of the singular vectors ≥ --match, with the stage each was born
    in) and vanished, cumulative counts, and each one's c_j (the ε at which it
    would stop counting).

    \b
    Example:
      surgeon intruders ./my-lora --base ./Llama-3.2-1B
      surgeon intruders ./full-ft --base ./Llama-3.2-1B --targets qv --plot figs/
      surgeon intruders --base ./bert --adapter ./lora --epsilon 0.3 --json
      surgeon intruders ./lora-a ./lora-b ./full-ft --base ./bert --html report.html
      surgeon intruders ./stage1 ./stage2 ./stage3 --base ./bert --sequence --json
      torchrun --nproc-per-node 8 -m surgeon intruders ./ft-* --base ./Llama-3.1-70B --json
    """
    with gc_paused():
        from surgeon.workflows.spectral.entry import run_intruders
        from surgeon.workflows.spectral.intruders import IntruderOptions
        from surgeon.workflows.spectral.multi import ManyReport

    report = run_intruders(list(tuned), base, adapter=adapter, targets=targets, device=device, cache=cache,
                           use_cache=not no_cache, plot=plot, plot_matrices=plot_matrices, sequence=sequence,
                           match=match, html=html, overwrite=overwrite, world=world,
                           options=IntruderOptions(epsilon=epsilon, top_k=top_k, side=side, method=method))
    if as_json:
        emit_json("intruders", report.to_dict())
        return
    if isinstance(report, ManyReport):
        render_many(report)
    else:
        render(report)
    if html:
        info(f"wrote {html}")


def render_many(report: ManyReport) -> None:
    """Several models side by side: totals, per module, per layer, the ε sweep; then the sequence view."""
    from surgeon.workflows.spectral.multi import model_label

    models = report.models
    labels = [model_label(m.tuned or m.adapter or "?", i) for i, m in enumerate(models)]
    click.echo("models: " + "; ".join(f"{label} = {m.tuned or m.adapter}" for label, m in zip(labels, models)))
    heads = [label.split(":")[0] for label in labels]
    rows: list[list[object]] = [["intruders"] + [m.totals["intruders"] for m in models],
                                ["matrices with intruders"] + [f"{m.totals['with_intruders']}/{m.totals['analysed']}"
                                                               for m in models]]
    modules = sorted({k for m in models for k in m.totals["per_module"]})
    rows += [[f"  {mod}"] + [m.totals["per_module"].get(mod, 0) for m in models] for mod in modules]
    layers = sorted({k for m in models for k in m.totals["per_layer"]}, key=lambda x: (x == "-", int(x) if x.isdigit() else 0))
    rows += [[f"  layer {layer}"] + [m.totals["per_layer"].get(layer, 0) for m in models] for layer in layers]
    sweep = sorted({k for m in models for k in m.totals["sweep"]}, key=float)
    rows += [[f"  ε={eps}"] + [m.totals["sweep"].get(eps, 0) for m in models] for eps in sweep]
    table(["", *(f"model {h}" for h in heads)], rows)
    if report.sequence is not None:
        render_sequence(report.sequence)
    c = report.cache
    info(f"{report.seconds:.1f}s; base decompositions: {c['misses']} computed, {c['hits']} reused"
         + (f" ({c['dir']})" if c["dir"] else " (temporary cache)"))


def render_sequence(view: SequenceReport) -> None:
    click.echo("")
    table(["stage", "intruders", "new", "persisting", "vanished", "cumulative", "by stage born"],
          [(s.stage, s.intruders, s.new, s.persisting, s.vanished, s.cumulative,
            ", ".join(f"{k}:{v}" for k, v in s.born.items()) or "-") for s in view.stages])


def render(report: IntrudersReport) -> None:
    """The per-matrix table, the totals and the ε sweep."""
    analysed = [m for m in report.matrices if m.status == "analysed"]
    rows = sorted(analysed, key=lambda m: (-len(m.intruders), -m.energy_share))[:_SHOW_ROWS]
    side = "c_j" if report.side == "left" else f"c_j ({report.side})"
    table(["tensor", "shape", "intruders", "ranks", f"min {side}", "energy", "random"],
          [(m.name, "x".join(map(str, m.shape)), len(m.intruders), ",".join(map(str, m.intruders)) or "-",
            f"{min(m.decisive):.3f}", f"{m.energy_share:.1%}", f"{m.baseline_left or m.baseline_right:.3f}")
           for m in rows])
    if len(analysed) > len(rows):
        click.echo(f"... {len(analysed) - len(rows)} more matrices (all of them: --json)")
    t = report.totals
    click.echo(f"\n{t['intruders']} intruders (ε={report.epsilon:g}, top-{report.top_k}) in {t['with_intruders']} of "
               f"{t['analysed']} changed matrices" + (f"; {t['unchanged']} unchanged" if t["unchanged"] else ""))
    if t["per_module"]:
        click.echo("per module: " + ", ".join(f"{k} {v}" for k, v in t["per_module"].items()))
    if len(t["per_layer"]) > 1:
        click.echo("per layer:  " + ", ".join(f"{k}:{v}" for k, v in t["per_layer"].items()))
    click.echo("ε sweep:    " + ", ".join(f"{k}:{v}" for k, v in t["sweep"].items()))
    c = report.cache
    info(f"{report.seconds:.1f}s on {report.device}; base cache "
         + (f"{c['hits']} hits, {c['misses']} misses ({c['dir']})" if c["dir"] else "off")
         + "; methods " + ", ".join(f"{k} {v}" for k, v in report.methods.items()))
    for path in report.plots:
        info(f"wrote {path}")

