"""The one call behind `surgeon intruders`: one model, several side by side, or a sequence; and the page."""

from __future__ import annotations

import os
from collections.abc import Sequence

from surgeon.errors import SurgeonError
from surgeon.ops.targets import DEFAULT_PRESET
from surgeon.workflows.spectral.intruders import find_intruders
from surgeon.workflows.spectral.multi import ManyReport, check_tuned, find_intruders_many
from surgeon.workflows.spectral.results import IntruderOptions, IntrudersReport
from surgeon.workflows.spectral.sequence import DEFAULT_MATCH, find_intruders_sequence


def run_intruders(
    tuned: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    *,
    adapter: str | os.PathLike[str] | None = None,
    targets: str = DEFAULT_PRESET,
    options: IntruderOptions = IntruderOptions(),
    device: str = "auto",
    cache: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    plot: str | os.PathLike[str] | None = None,
    plot_matrices: str | None = None,
    sequence: bool = False,
    match: float = DEFAULT_MATCH,
    html: str | os.PathLike[str] | None = None,
) -> IntrudersReport | ManyReport:
    """One TUNED (or only ``adapter``): :func:`find_intruders`, the one-model report. Several: one report
    per model (:func:`find_intruders_many`); ``sequence``: the stages view too. ``html``: write the page."""
    if html is not None:
        from surgeon.workflows.spectral.page import check_page_path

        check_page_path(html)
    report: IntrudersReport | ManyReport
    if sequence:
        if plot is not None:
            raise SurgeonError("--plot with --sequence: the sequence view draws its figures into --html FILE; "
                               "drop --plot (or run without --sequence for per-model PNGs).")
        if adapter is not None:
            raise SurgeonError("--adapter with --sequence: give every stage (checkpoint or adapter folder) as TUNED.")
        report = find_intruders_sequence(tuned, base, targets=targets, options=options, match=match, device=device,
                                         cache=cache, use_cache=use_cache)
    elif len(tuned) > 1:
        check_tuned(tuned, adapter=adapter)
        report = find_intruders_many(tuned, base, targets=targets, options=options, device=device, cache=cache,
                                     use_cache=use_cache, plot=plot, plot_matrices=plot_matrices)
    else:
        report = find_intruders(tuned[0] if tuned else None, base, adapter=adapter, targets=targets, options=options,
                                device=device, cache=cache, use_cache=use_cache, plot=plot,
                                plot_matrices=plot_matrices)
    if html is not None:
        from surgeon.workflows.spectral.page import write_intruders_page

        write_intruders_page(html, report, plot_matrices=plot_matrices)
    return report
