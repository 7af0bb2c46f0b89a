"""`--html FILE` of `surgeon intruders` and `surgeon scale-intruders`: the report page for the user's models.

One self-contained file in the demo report's style (surgeon/report): summary cards,
counts per model, layer and module type, the ε sweep, similarity heat-maps of the
matrices with the most intruder energy, their singular-value spectra before (the base)
and after (each model), and the sequence view when the models are stages. Figures are
drawn into a temporary folder and embedded as ``data:`` URIs; the reports' JSON is
embedded too. Nothing on the page is fetched, so it opens with no network.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from surgeon import __version__
from surgeon.errors import OutputError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.output import check_not_output, check_side_output, write_side_output
from surgeon.io.resolve import resolve_path
from surgeon.ops import svd
from surgeon.ops.targets import Target
from surgeon.report import figures
from surgeon.report.html import cards, escape, figure, kv, page, section, table
from surgeon.report.text import pct, secs
from surgeon.workflows.spectral.multi import ManyReport, model_label
from surgeon.workflows.spectral.plots import DEFAULT_SIMILARITY_PLOTS, choose
from surgeon.workflows.spectral.results import IntrudersReport, MatrixIntruders
from surgeon.workflows.spectral.spectrum import linear_float64

Models = Sequence[tuple[str, IntrudersReport]]


def check_page_path(path: str | os.PathLike[str], *, overwrite: bool = False,
                    inputs: Sequence[str | os.PathLike[str] | None] = (),
                    outputs: Sequence[str | os.PathLike[str] | None] = ()) -> Path:
    """Fail before any work when the page cannot be written there: the side-output rules (never into
    an input, never over a file without ``overwrite``, a writable folder) and never into or over the
    command's other ``outputs`` (its checkpoint, its ``-o`` file)."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{p}: is a folder; --html takes a file name, e.g. --html {p / 'report.html'}.")
    check_not_output(p, outputs, what="page")
    if not p.parent.exists() and p.parent != Path(""):
        raise OutputError(f"{p.parent}: no such folder for --html {p}; create it or choose another path.")
    return check_side_output(p, overwrite=overwrite, inputs=[i for i in inputs if i is not None], what="page")


def write_page(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` under the side-output rules (atomic; never over a file without ``overwrite``)."""
    write_side_output(path, text, overwrite=overwrite, what="page")
    return Path(path)


class Figures:
    """Figures drawn into a temporary folder, embedded by :meth:`embed`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def draw(self, draw: Callable[[Path], None], caption: str) -> str:
        self.count += 1
        rel = f"figure-{self.count}.png"
        draw(self.root / rel)
        return figure(self.root, {"file": rel, "caption": caption})


def _color(i: int) -> str:
    return figures.PALETTE[i % len(figures.PALETTE)]


# -- sections --------------------------------------------------------------------------------------
def _cards(models: Models, extra: Sequence[dict[str, str]]) -> str:
    first = models[0][1]
    counts = " / ".join(str(r.totals["intruders"]) for _, r in models)
    with_intr = " / ".join(f"{r.totals['with_intruders']}/{r.totals['analysed']}" for _, r in models)
    shares = [m.energy_share for _, r in models for m in r.matrices if m.intruders]
    items = [
        {"key": "intruders", "text": counts, "label": "intruder dimensions" + (" per model" if len(models) > 1 else ""),
         "detail": f"top-{first.top_k}, \u03b5 = {first.epsilon:g}, side {first.side}"},
        {"key": "matrices", "text": with_intr, "label": "matrices with intruders / changed",
         "detail": f"{first.totals['matrices']} matrices selected ({first.targets})"},
        {"key": "energy", "text": pct(max(shares)) if shares else "n/a", "label": "largest intruder energy share",
         "detail": "\u03a3\u03c3\u00b2 of a matrix's intruders / \u03a3\u03c3\u00b2 of its top-k"},
        *extra,
    ]
    return cards(items)


def _models_section(models: Models) -> str:
    rows = [(label, r.tuned or r.adapter or "-", r.totals["intruders"], r.totals["with_intruders"], r.totals["analysed"],
             r.totals["unchanged"], secs(r.seconds)) for label, r in models]
    text = ("<p>A left singular vector u<sub>j</sub> among the top-k of a fine-tuned matrix is an <em>intruder</em> "
            "when its largest |cos| with every singular vector of the base matrix, c<sub>j</sub>, stays below \u03b5 "
            "(arXiv 2410.21228, the authors' definition).</p>")
    return section("Models", "models", text + kv([("base", models[0][1].base)]) + table(
        ["model", "path", "intruders", "matrices with intruders", "changed", "unchanged", "time"], rows))


def _layers(models: Models) -> list[str]:
    keys = {k for _, r in models for k in r.totals["per_layer"]}
    return sorted(keys, key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0, x))


def _counts_section(models: Models, figs: Figures) -> str:
    layers = _layers(models)
    series = [(label, [r.totals["per_layer"].get(layer, 0) for layer in layers], _color(i))
              for i, (label, r) in enumerate(models)]
    eps = models[0][1].epsilon
    bars = figs.draw(lambda p: figures.bars(p, layers, series, stacked=False, xlabel="layer",
                                            ylabel=f"intruders (\u03b5={eps:g})", title="Intruder dimensions per layer",
                                            size=(7.0, 3.4), integer=True, clean=True),
                     "Intruder dimensions per layer, one bar per model.")
    modules = sorted({k for _, r in models for k in r.totals["per_module"]})
    by_module = table(["module type", *(label for label, _ in models)],
                      [(m, *(r.totals["per_module"].get(m, 0) for _, r in models)) for m in modules])
    by_layer = table(["layer", *(label for label, _ in models)],
                     [(layer, *(r.totals["per_layer"].get(layer, 0) for _, r in models)) for layer in layers])
    return section("Intruders per layer and module type", "counts", bars + f'<div class="grid2">{by_layer}{by_module}</div>')


def _sweep_section(models: Models, figs: Figures) -> str:
    keys = sorted({k for _, r in models for k in r.totals["sweep"]}, key=float)
    series = [(label, [float(k) for k in keys], [r.totals["sweep"].get(k, 0) for k in keys], _color(i))
              for i, (label, r) in enumerate(models)]
    eps = models[0][1].epsilon
    plot = figs.draw(lambda p: figures.lines(p, series, xlabel="\u03b5", ylabel="intruders (all matrices)",
                                             title="Intruder count against \u03b5", size=(7.0, 3.0), vline=eps, clean=True),
                     f"Total intruder count against the threshold \u03b5 (dotted: \u03b5 = {eps:g}, the one used).")
    rows = [(label, *(r.totals["sweep"].get(k, 0) for k in keys)) for label, r in models]
    return section("The \u03b5 sweep", "sweep", plot + table(["model", *(f"\u03b5={k}" for k in keys)], rows))


def _chosen(models: Models, select: str | None) -> list[tuple[int, MatrixIntruders]]:
    """(model index, matrix) pairs to draw: the matrices with the most intruder energy (or ``select``)."""
    per_model = DEFAULT_SIMILARITY_PLOTS if len(models) == 1 else 2
    out = []
    for i, (_, r) in enumerate(models):
        out += [(i, row) for row in choose(r.matrices, select)[: (None if select else per_model)]]
    return out


def base_spectra(base: str, rows: Sequence[MatrixIntruders], count: int) -> dict[str, list[float]]:
    """The top ``count`` singular values of the base matrices behind ``rows`` (float64, dense)."""
    out: dict[str, list[float]] = {}
    with Checkpoint.open(resolve_path(base)) as ckpt:
        for row in rows:
            if row.name in out or row.name not in ckpt:
                continue
            info = ckpt.info(row.name)
            target = Target(row.name, row.layer, row.module, tuple(info.shape), row.transposed)  # type: ignore[arg-type]
            w = linear_float64(ckpt.read_raw(row.name), ckpt, target)
            out[row.name] = [float(x) for x in svd.singular_values(w)[:count]]
    return out


def _matrices_section(models: Models, figs: Figures, select: str | None) -> str:
    chosen = _chosen(models, select)
    if not chosen:
        return section("Matrices with the most intruder energy", "matrices", "<p>No changed matrix to draw.</p>")
    k = models[0][1].top_k
    before = base_spectra(models[0][1].base, [row for _, row in chosen], 2 * k)
    parts = []
    for i, row in chosen:
        label = models[i][0]
        eps = models[i][1].epsilon
        sim = figs.draw(lambda p, row=row: figures.similarity(
            p, row.similarity, row.intruders, xlabel=f"base singular vector, by rank (top {row.similarity.shape[1]})",
            ylabel="tuned singular vector",
            title=f"{row.name}: |cos| of singular vectors ({len(row.intruders)} intruders at \u03b5={eps:g})"),
            f"{label}, {row.name}: |cos| between its top-{k} left singular vectors (rows) and the base's (columns); "
            "a row with no bright cell is an intruder.")
        series = [("base (before)", before.get(row.name, []), figures.BASE_COLOR, [])]
        series.append((f"{label} (after)", row.sigma, _color(i), row.intruders))
        spec = figs.draw(lambda p, series=series, row=row: figures.spectra(
            p, series, title=f"{row.name}: singular values"),
            f"{label}, {row.name}: singular values of the base and of the fine-tune (circled: intruders).")
        parts.append(sim + spec)
    text = ("<p>For each model, the matrices whose intruders carry the largest share of the top-k energy: the "
            "similarity heat-map of their singular vectors and their singular values before (base) and after.</p>")
    return section("Matrices with the most intruder energy", "matrices", text + "".join(parts))


def _sequence_section(view: Any, figs: Figures) -> str:
    stages = view.stages
    borns = sorted({int(b) for s in stages for b in s.born})
    series = [(f"born at stage {b}", [s.born.get(str(b), 0) for s in stages], _color(b - 1)) for b in borns]
    cats = [f"stage {s.stage}" for s in stages]
    plot = figs.draw(lambda p: figures.bars(p, cats, series, stacked=True, xlabel="stage", ylabel="intruders",
                                            title="Intruders per stage, by the stage they were born in",
                                            size=(6.0, 3.4), integer=True, clean=True),
                     "Intruders present after each stage, stacked by the stage in which each first appeared.")
    rows = [(s.stage, Path(s.model).name, s.intruders, s.new, s.persisting, s.vanished, s.cumulative) for s in stages]
    last = sorted(stages[-1].items, key=lambda x: (x.born, x.stops_at_epsilon))[:40]
    items = table(["matrix", "rank", "born at stage", "c_j (stops counting at \u03b5 \u2264)", "\u03c3", "|cos| to previous"],
                  [(x.matrix, x.rank, x.born, f"{x.stops_at_epsilon:.3f}", f"{x.sigma:.4g}",
                    "-" if x.match is None else f"{x.match:.3f}") for x in last])
    text = (f"<p>The models are stages of one continual run, in order. An intruder <em>persists</em> when its "
            f"singular vector matches one of the previous stage's intruders (|cos| \u2265 {view.match:g}); it keeps "
            "the stage it was born in. <em>Cumulative</em> counts every intruder born so far.</p>")
    return section("Across the stages", "sequence", text + plot + table(
        ["stage", "model", "intruders", "new", "persisting", "vanished", "cumulative"], rows)
        + f"<p>Intruders after the last stage ({len(stages[-1].items)}{', first 40' if len(stages[-1].items) > 40 else ''}):</p>"
        + items)


# -- pages -----------------------------------------------------------------------------------------
def models_of(report: IntrudersReport | ManyReport) -> tuple[list[tuple[str, IntrudersReport]], Any]:
    if isinstance(report, ManyReport):
        return [(model_label(m.tuned or m.adapter or "?", i), m) for i, m in enumerate(report.models)], report.sequence
    return [(Path(report.tuned or report.adapter or "tuned").name, report)], None


def build_page(models: Models, *, heading: str, subtitle: str, root: Path, data: Any, sequence: Any = None,
               plot_matrices: str | None = None, extra_cards: Sequence[dict[str, str]] = (),
               extra_sections: Sequence[str] = ()) -> str:
    figs = Figures(root)
    body = [_cards(models, extra_cards), *extra_sections, _models_section(models)]
    if sequence is not None:
        body.append(_sequence_section(sequence, figs))
    body += [_counts_section(models, figs), _sweep_section(models, figs), _matrices_section(models, figs, plot_matrices)]
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    return page(title=heading, heading=heading, subtitle=subtitle, body=body,
                footer=f"surgeon {__version__} \u00b7 {created} \u00b7 the reports' JSON is embedded in this page",
                data=data, data_id="surgeon-data")


def write_intruders_page(path: str | os.PathLike[str], report: IntrudersReport | ManyReport, *,
                         plot_matrices: str | None = None, overwrite: bool = False) -> Path:
    """The page for `surgeon intruders` (one model, several, or a sequence)."""
    figures.pyplot()
    models, sequence = models_of(report)
    what = "stages of one continual run" if sequence is not None else (
        f"{len(models)} fine-tunes" if len(models) > 1 else "a fine-tune")
    with tempfile.TemporaryDirectory(prefix="surgeon-page-") as tmp:
        text = build_page(models, heading="surgeon intruders",
                          subtitle=f"Intruder dimensions of {what} of {models[0][1].base}.", root=Path(tmp),
                          data={"command": "intruders", **report.to_dict()}, sequence=sequence,
                          plot_matrices=plot_matrices)
    return write_page(path, text, overwrite=overwrite)


def write_scale_page(path: str | os.PathLike[str], scale: Any, before: IntrudersReport, after: IntrudersReport, *,
                     sequence: Any = None, overwrite: bool = False) -> Path:
    """The page for `surgeon scale-intruders`: the model before and after, and every change made."""
    figures.pyplot()
    label_after = f"after (\u03bb = {scale.lam:g})"
    rows = [(c.name, ",".join(map(str, c.ranks)), " ".join(f"{x:.2f}" for x in c.cosines),
             " ".join(f"{x:.3g}" for x in c.sigma_before), " ".join(f"{x:.3g}" for x in c.sigma_after),
             f"{c.delta_norm:.3g}") for c in scale.changes]
    changes = section("What was rescaled", "changes", (
        f"<p>Each intruder's singular value \u03c3<sub>j</sub> became \u03bb\u03c3<sub>j</sub> (\u03bb = {escape(f'{scale.lam:g}')}); "
        f"written to <code>{escape(scale.output)}</code>. 'after' is the written model analysed again.</p>")
        + table(["tensor", "ranks", "c_j", "\u03c3 before", "\u03c3 after", "\u2016\u0394W\u2016"], rows))
    extra = [{"key": "scaled", "text": str(sum(len(c.ranks) for c in scale.changes)), "label": "intruders rescaled",
              "detail": f"in {len(scale.changes)} matrices, \u03bb = {scale.lam:g}"}]
    with tempfile.TemporaryDirectory(prefix="surgeon-page-") as tmp:
        text = build_page([("before", before), (label_after, after)], heading="surgeon scale-intruders",
                          subtitle=f"{before.tuned or before.adapter} with its intruders scaled by \u03bb = {scale.lam:g}.",
                          root=Path(tmp), extra_cards=extra, extra_sections=[changes], sequence=sequence,
                          data={"command": "scale-intruders", "scale": scale.to_dict(), "before": before.to_dict(),
                                "after": after.to_dict()})
    return write_page(path, text, overwrite=overwrite)
