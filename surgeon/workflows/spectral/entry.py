"""The one call behind `surgeon intruders` (one model, several side by side, or a sequence) and behind
`surgeon scale-intruders` (one model, or the last stage of a sequence); and their pages."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgeon.errors import OptionError
from surgeon.ops.targets import DEFAULT_PRESET
from surgeon.parallel.world import SOLO, World
from surgeon.workflows.spectral.intruders import find_intruders
from surgeon.workflows.spectral.multi import ManyReport, _plot_dir, check_tuned, find_intruders_many
from surgeon.workflows.spectral.results import IntruderOptions, IntrudersReport
from surgeon.workflows.spectral.scale_intruders import ScaleReport, scale_intruders
from surgeon.workflows.spectral.sequence import DEFAULT_MATCH, SequenceReport, find_intruders_sequence


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
    overwrite: bool = False,
    world: World = SOLO,
) -> IntrudersReport | ManyReport:
    """One TUNED (or only ``adapter``): :func:`find_intruders`, the one-model report. Several: one report
    per model (:func:`find_intruders_many`); ``sequence``: the stages view too. ``html``: write the page
    (``overwrite``: replacing an existing file)."""
    if html is not None:
        from surgeon.workflows.spectral.page import check_page_path

        check_page_path(html, overwrite=overwrite, inputs=[*tuned, base, adapter])
    if plot is not None:  # before any work: the folder (and each model's subfolder) is never an input
        from surgeon.io.output import check_not_input

        folders = [plot] if len(tuned) < 2 else [_plot_dir(plot, t, i) for i, t in enumerate(tuned)]
        for folder in folders:
            check_not_input(Path(folder), [p for p in (*tuned, base, adapter) if p is not None], what="plot folder")
    refuse_non_finite_adapters([*tuned, adapter])
    report: IntrudersReport | ManyReport
    if sequence:
        if plot is not None:
            raise OptionError("--plot with --sequence: the sequence view draws its figures into --html FILE; "
                               "drop --plot (or run without --sequence for per-model PNGs).")
        if adapter is not None:
            raise OptionError("--adapter with --sequence: give every stage (checkpoint or adapter folder) as TUNED.")
        report = find_intruders_sequence(tuned, base, targets=targets, options=options, match=match, device=device,
                                         cache=cache, use_cache=use_cache)
    elif len(tuned) > 1:
        check_tuned(tuned, adapter=adapter)
        report = find_intruders_many(tuned, base, targets=targets, options=options, device=device, cache=cache,
                                     use_cache=use_cache, plot=plot, plot_matrices=plot_matrices, world=world)
    else:
        report = find_intruders(tuned[0] if tuned else None, base, adapter=adapter, targets=targets, options=options,
                                device=device, cache=cache, use_cache=use_cache, plot=plot,
                                plot_matrices=plot_matrices, world=world)
    if html is not None and world.is_main:
        from surgeon.workflows.spectral.page import write_intruders_page

        write_intruders_page(html, report, plot_matrices=plot_matrices, overwrite=overwrite)
    return report


def refuse_non_finite_adapters(paths: Sequence[str | os.PathLike[str] | None]) -> None:
    """Before any work: a NaN/Inf factor in an adapter given (as TUNED or --adapter) is one line naming it."""
    from surgeon.io.adapter import Adapter, is_adapter_folder
    from surgeon.io.finite_inputs import refuse_non_finite_adapter
    from surgeon.io.resolve import resolve_path

    for given in (p for p in paths if p is not None):
        path = resolve_path(given)
        if is_adapter_folder(path):
            with Adapter.open(path) as opened:
                refuse_non_finite_adapter(opened.weights)


@dataclass(frozen=True)
class ScaleRun:
    """`surgeon scale-intruders`: the scale report, the stages view when ``--sequence-from`` was given."""

    report: ScaleReport
    sequence: SequenceReport | None
    sequence_from: int | None

    def to_dict(self) -> dict[str, Any]:
        body = self.report.to_dict()
        if self.sequence is not None:
            body.update(sequence_from=self.sequence_from, sequence=self.sequence.to_dict())
        return body


def run_scale_intruders(
    tuned: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    lam: float,
    adapter: str | os.PathLike[str] | None = None,
    targets: str = DEFAULT_PRESET,
    options: IntruderOptions = IntruderOptions(),
    device: str = "auto",
    cache: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    sequence_from: int | None = None,
    match: float = DEFAULT_MATCH,
    html: str | os.PathLike[str] | None = None,
    world: World = SOLO,
    **write: Any,
) -> ScaleRun:
    """:func:`scale_intruders` of the last TUNED. With ``sequence_from`` the TUNED are the stages of one
    continual run and only the last stage's intruders born at that stage or later are rescaled.
    ``html``: the page (the model before, the written one analysed again after). ``write``: the
    writer's options of :func:`scale_intruders` (only_top, as_adapter, max_shard_size, overwrite)."""
    if html is not None:
        from surgeon.workflows.spectral.page import check_page_path

        check_page_path(html, overwrite=bool(write.get("overwrite")), inputs=[*tuned, base, adapter], outputs=[out])
    refuse_non_finite_adapters([*tuned, adapter])
    view, before, ranks = None, None, None
    if sequence_from is not None:
        if adapter is not None:
            raise OptionError("--adapter with --sequence-from: give every stage (checkpoint or adapter folder) as TUNED.")
        if len(tuned) < 2 or not 1 <= sequence_from <= len(tuned):
            raise OptionError(f"--sequence-from {sequence_from} with {len(tuned)} TUNED: give the stages of the run in "
                               f"order (at least two) and a stage from 1 to {max(len(tuned), 1)}.")
        seq = find_intruders_sequence(tuned, base, targets=targets, options=options, match=match, device=device,
                                      cache=cache, use_cache=use_cache)
        view, before = seq.sequence, seq.models[-1]
        ranks = view.born_at_or_after(sequence_from)
    elif len(tuned) > 1:
        raise OptionError(f"{len(tuned)} TUNED: scale-intruders rewrites one model; give one TUNED, or the stages of "
                           "a continual run with --sequence-from STAGE.")
    last = tuned[-1] if tuned else None
    report = scale_intruders(last, base, out, lam=lam, adapter=adapter, targets=targets, options=options,
                             device=device, cache=cache, use_cache=use_cache, only_ranks=ranks, world=world, **write)
    if html is not None and world.is_main:
        from surgeon.workflows.spectral.page import write_scale_page

        if before is None:
            before = find_intruders(last, base, adapter=adapter, targets=targets, options=options, device=device,
                                    cache=cache, use_cache=use_cache)
        after = find_intruders(out, base, targets=targets, options=options, device=device, cache=cache,
                               use_cache=use_cache)
        write_scale_page(html, report, before, after, sequence=view, overwrite=bool(write.get("overwrite")))
    return ScaleRun(report, view, sequence_from)
