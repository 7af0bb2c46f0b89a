"""`surgeon spectrum --html FILE`: the singular values of a model's matrices as a self-contained page.

Cards (matrices, the largest σ₁, the median stable rank), σ₁ and the stable rank per layer
for each module type, the spectra of the matrices with the largest σ₁, and the table of
every matrix. Figures embedded as ``data:`` URIs, the report's JSON embedded too.
"""

from __future__ import annotations

import datetime as _dt
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from surgeon import __version__
from surgeon.report import figures
from surgeon.report.html import cards, page, section, table
from surgeon.report.text import num, secs
from surgeon.workflows.spectral.page import Figures, check_page_path, write_page

SPECTRA_DRAWN = 6
TABLE_ROWS = 80


def _per_layer(report: Any, figs: Figures, value: str, label: str) -> str:
    modules = sorted({m.module for m in report.matrices if m.layer is not None})
    series = []
    for i, module in enumerate(modules):
        pts = sorted((m.layer, getattr(m, value)) for m in report.matrices if m.module == module and m.layer is not None)
        series.append((module, [float(x) for x, _ in pts], [float(y) for _, y in pts],
                       figures.PALETTE[i % len(figures.PALETTE)]))
    if not series:
        return ""
    return figs.draw(lambda p: figures.lines(p, series, xlabel="layer", ylabel=label, title=f"{label} per layer",
                                             size=(6.4, 3.2), clean=True, integer_x=True),
                     f"{label} of each matrix against its layer, one line per module type.")


def write_spectrum_page(path: str | os.PathLike[str], report: Any, *, overwrite: bool = False) -> Path:
    """The page for a :class:`surgeon.workflows.spectral.spectrum.SpectrumReport`."""
    check_page_path(path, overwrite=overwrite, inputs=[report.model], outputs=[report.output])
    figures.pyplot()
    rows = report.matrices
    top = max(rows, key=lambda m: m.spectral_norm)
    items = [
        {"key": "matrices", "text": str(len(rows)), "label": "matrices decomposed",
         "detail": f"{report.targets}; {'every singular value' if report.full else f'top-{report.top_k}'}"},
        {"key": "sigma1", "text": num(top.spectral_norm), "label": "largest \u03c3\u2081", "detail": top.name},
        {"key": "stable_rank", "text": f"{statistics.median(m.stable_rank for m in rows):.2f}",
         "label": "median stable rank \u2016W\u2016\u00b2_F / \u03c3\u2081\u00b2", "detail": f"{secs(report.seconds)} on {report.device}"},
    ]
    with tempfile.TemporaryDirectory(prefix="surgeon-page-") as tmp:
        figs = Figures(Path(tmp))
        trends = _per_layer(report, figs, "spectral_norm", "\u03c3\u2081") + _per_layer(report, figs, "stable_rank",
                                                                                         "stable rank")
        drawn = sorted(rows, key=lambda m: -m.spectral_norm)[:SPECTRA_DRAWN]
        series = [(m.name, m.singular_values, figures.PALETTE[i % len(figures.PALETTE)], []) for i, m in enumerate(drawn)]
        spectra = figs.draw(lambda p: figures.spectra(p, series, title="Singular values of the matrices with the largest \u03c3\u2081",
                                                      size=(7.0, 3.6)),
                            f"Singular values against rank of the {len(drawn)} matrices with the largest \u03c3\u2081.")
        full = report.full
        listing = table(["tensor", "shape", "\u03c3\u2081", "\u2016W\u2016_F", "stable rank", *(["eff. rank"] if full else [])],
                        [(m.name, "x".join(map(str, m.shape)), num(m.spectral_norm), num(m.frobenius_norm),
                          f"{m.stable_rank:.2f}", *([f"{m.effective_rank:.1f}"] if full else [])) for m in rows[:TABLE_ROWS]])
        more = f"<p>{len(rows) - TABLE_ROWS} more in the embedded JSON.</p>" if len(rows) > TABLE_ROWS else ""
        body = [cards(items), section("Per layer", "layers", trends or "<p>No layered matrices.</p>"),
                section("Spectra", "spectra", spectra), section("Every matrix", "matrices", listing + more)]
        created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        text = page(title=f"surgeon spectrum: {Path(report.model).name}", heading="surgeon spectrum",
                    subtitle=f"Singular values of the weight matrices of {report.model}.", body=body,
                    footer=f"surgeon {__version__} \u00b7 {created} \u00b7 the report's JSON is embedded in this page",
                    data={"command": "spectrum", **report.to_dict()}, data_id="surgeon-data")
    return write_page(path, text, overwrite=overwrite)
