"""PNG figures for `surgeon intruders --plot DIR` (matplotlib, imported only here, only when asked).

* ``similarity-<tensor>.png``: |U_tᵀU₀| for the top-k tuned (rows) × top-N base (columns)
  singular vectors of chosen matrices, as in the paper's Figure 2: a diagonal of bright
  cells where fine-tuning kept the base's directions, dark rows where an intruder is.
* ``intruders-per-layer.png``: intruder counts per layer, stacked by module type.
* ``epsilon-sweep.png``: total intruder count against ε.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import OptionError, OutputError
from surgeon.io.output import check_not_input, show, side_file
from surgeon.report import figures

if TYPE_CHECKING:
    from surgeon.workflows.spectral.results import MatrixIntruders

DEFAULT_SIMILARITY_PLOTS = 4


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "matrix"


def choose(rows: Sequence[MatrixIntruders], select: str | None) -> list[MatrixIntruders]:
    """Matrices to draw: those matching ``select`` (a regex), else the ones with the largest intruder energy."""
    analysed = [r for r in rows if r.similarity is not None]
    if select is not None:
        try:
            pattern = re.compile(select)
        except re.error as exc:
            raise OptionError(f"--plot-matrices {select!r} is not a valid regular expression ({exc}); escape special "
                              "characters, e.g. --plot-matrices 'layers\\.0\\.'.") from None
        return [r for r in analysed if pattern.search(r.name)]
    ranked = sorted(analysed, key=lambda r: (-r.energy_share, -len(r.intruders)))
    return ranked[:DEFAULT_SIMILARITY_PLOTS]


def _similarity(row: MatrixIntruders, path: Path, epsilon: float) -> None:
    n = row.similarity.shape[1]
    figures.similarity(path, row.similarity, row.intruders,
                       title=f"{row.name}: |cos| of singular vectors ({len(row.intruders)} intruders at \u03b5={epsilon:g})",
                       xlabel=f"base singular vector, by rank (top {n})", ylabel="tuned singular vector")


def _per_layer(rows: Sequence[MatrixIntruders], path: Path, epsilon: float) -> None:
    layers = sorted({r.layer for r in rows if r.layer is not None})
    modules = sorted({r.module for r in rows})
    series = [(module, [sum(len(r.intruders) for r in rows if r.layer == layer and r.module == module) for layer in layers],
               None) for module in modules]
    figures.bars(path, [str(x) for x in layers], series, stacked=True, xlabel="layer",
                 ylabel=f"intruders (\u03b5={epsilon:g})", title="Intruder dimensions per layer")


def _sweep(rows: Sequence[MatrixIntruders], path: Path) -> None:
    keys = sorted({k for r in rows for k in r.sweep}, key=float)
    figures.lines(path, [("all matrices", [float(k) for k in keys], [sum(r.sweep.get(k, 0) for r in rows) for k in keys], None)],
                  xlabel="\u03b5", ylabel="intruders (all matrices)", title="Intruder count against \u03b5")


def write_plots(folder: Path, rows: Sequence[MatrixIntruders], *, epsilon: float,
                select: str | None = None) -> list[str]:
    """Write the figures into ``folder`` (created); returns the files written.

    Side-output rules: the folder is never an input or inside one, an existing figure is never
    replaced (choose an empty folder), and each PNG appears atomically.
    """
    figures.pyplot()  # fail before the folder is made when matplotlib is missing
    check_not_input(folder, what="plot folder")
    draws = [(folder / f"similarity-{_safe(row.name)}.png", lambda p, row=row: _similarity(row, p, epsilon))
             for row in choose(rows, select)]
    draws += [(folder / "intruders-per-layer.png", lambda p: _per_layer(rows, p, epsilon)),
              (folder / "epsilon-sweep.png", lambda p: _sweep(rows, p))]
    taken = [p.name for p, _ in draws if p.exists()]
    if taken:
        raise OutputError(f"{show(folder)}: already holds {', '.join(taken)}; surgeon never replaces a figure, "
                          "choose an empty --plot DIR.")
    written = []
    for path, draw in draws:
        with side_file(path, overwrite=False, what="plot") as tmp:
            draw(tmp)
        written.append(str(path))
    return written
