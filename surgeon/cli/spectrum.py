"""`surgeon spectrum MODEL`."""

from __future__ import annotations

import click

from surgeon.cli.common import emit_json, global_options, info, json_option, table
from surgeon.cli.lazy import gc_paused
from surgeon.cli.parallel import distributed_command
from surgeon.parallel.world import World
from surgeon.ops.targets import DEFAULT_PRESET, PRESETS

_SHOWN_VALUES = 4


@click.command("spectrum")
@click.argument("model")
@click.option("--targets", default=DEFAULT_PRESET, show_default=True, metavar="PRESET|REGEX",
              help=f"Matrices to decompose: a preset ({', '.join(PRESETS)}) or a regex searched in tensor names.")
@click.option("--top-k", "top_k", default=10, show_default=True, type=int,
              help="Compute only the k largest singular values (block Krylov, residual-checked).")
@click.option("--full", is_flag=True, help="Compute every singular value, and the effective rank.")
@click.option("--device", default="auto", show_default=True,
              help="Where to compute: auto (cuda if available), cpu, cuda.")
@click.option("--cache", "cache", default=None, metavar="DIR",
              help="With --full: keep (or reuse) each matrix's complete decomposition in DIR, so a later "
                   "`surgeon intruders --cache DIR` against this model starts warm.")
@click.option("-o", "--output", "out", default=None, metavar="FILE",
              help="Write every singular value: FILE.json (the report) or FILE.safetensors (one vector per matrix).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file (-o, --html).")
@click.option("--html", "html", default=None, metavar="FILE",
              help="Write a self-contained report page (σ₁ and stable rank per layer, spectra); needs surgeon[plot].")
@json_option
@global_options
@distributed_command
def command(model: str, targets: str, top_k: int, full: bool, device: str, cache: str | None, out: str | None,
            overwrite: bool, html: str | None, as_json: bool, world: World) -> None:
    """Singular values of every selected weight matrix, layer by layer, streamed.

    Per matrix (nn.Linear orientation; GPT-2 Conv1D weights are transposed): the
    top-k singular values, the spectral norm σ₁, the Frobenius norm and the stable
    rank ‖W‖²_F/σ₁²; with --full, every singular value and the effective rank
    exp(entropy of σ/Σσ). Arithmetic is float64; one tensor is in memory at a time
    while the next is read.

    \b
    Example:
      surgeon spectrum ./Llama-3.2-1B --targets qv --top-k 5
      surgeon spectrum ./bert-base --full -o spectrum.json
      surgeon spectrum ./bert-base --full --html spectrum.html
      surgeon spectrum ./model --targets 'layers\\.0\\..*proj\\.weight' --json
      surgeon spectrum ./model --full --nproc 2        # two local processes
      torchrun --nproc-per-node 8 -m surgeon spectrum ./model --full --json
    """
    with gc_paused():
        from surgeon.workflows.spectral.spectrum import spectrum

    if html is not None:
        from surgeon.workflows.spectral.page import check_page_path

        check_page_path(html, overwrite=overwrite, inputs=[model], outputs=[out])  # before the work, not after
    report = spectrum(model, targets=targets, top_k=top_k, full=full, device=device, cache=cache, output=out,
                      overwrite=overwrite, world=world)
    if html is not None and world.is_main:
        from surgeon.workflows.spectral.page_spectrum import write_spectrum_page

        write_spectrum_page(html, report, overwrite=overwrite)
    if as_json:
        emit_json("spectrum", report.to_dict())
        return
    shown = min(_SHOWN_VALUES, top_k) if not full else _SHOWN_VALUES
    headers = ["tensor", "shape", "σ₁", "stable rank"] + (["eff. rank"] if full else []) + [f"σ₁..σ{shown}"]
    rows = []
    for m in report.matrices:
        row = [m.name, "x".join(map(str, m.shape)), f"{m.spectral_norm:.4g}", f"{m.stable_rank:.2f}"]
        if full:
            row.append(f"{m.effective_rank:.1f}")
        row.append(" ".join(f"{x:.3g}" for x in m.singular_values[:shown]))
        rows.append(row)
    table(headers, rows)
    info(f"{len(report.matrices)} matrices in {report.seconds:.1f}s on {report.device}"
         + (f"; wrote {report.output}" if report.output else "") + (f"; wrote {html}" if html else ""))
