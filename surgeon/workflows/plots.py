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

from surgeon.errors import OutputError, SurgeonError

if TYPE_CHECKING:
    from surgeon.workflows.intruders import MatrixIntruders

DEFAULT_SIMILARITY_PLOTS = 4


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SurgeonError("--plot needs matplotlib, which is not installed; pip install surgeon[plot]") from None
    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "matrix"


def choose(rows: Sequence[MatrixIntruders], select: str | None) -> list[MatrixIntruders]:
    """Matrices to draw: those matching ``select`` (a regex), else the ones with the largest intruder energy."""
    analysed = [r for r in rows if r.similarity is not None]
    if select is not None:
        try:
            pattern = re.compile(select)
        except re.error as exc:
            raise SurgeonError(f"--plot-matrices {select!r} is not a valid regular expression ({exc}).") from None
        return [r for r in analysed if pattern.search(r.name)]
    ranked = sorted(analysed, key=lambda r: (-r.energy_share, -len(r.intruders)))
    return ranked[:DEFAULT_SIMILARITY_PLOTS]


def _similarity(plt: Any, row: MatrixIntruders, path: Path, epsilon: float) -> None:
    sim = row.similarity
    fig, ax = plt.subplots(figsize=(min(12, 2 + sim.shape[1] / 10), 3.2))
    k, n = sim.shape
    image = ax.imshow(sim, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest",
                      extent=(0.5, n + 0.5, k + 0.5, 0.5))  # ranks from 1 on both axes
    ax.set_xlabel(f"base singular vector, by rank (top {n})")
    ax.set_ylabel("tuned singular vector")
    ax.set_yticks(range(1, k + 1))
    for j in row.intruders:
        ax.annotate("intruder", (n + 0.3, j), color="red", fontsize=7, ha="right", va="center")
    ax.set_title(f"{row.name}: |cos| of singular vectors ({len(row.intruders)} intruders at ε={epsilon:g})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_layer(plt: Any, rows: Sequence[MatrixIntruders], path: Path, epsilon: float) -> None:
    layers = sorted({r.layer for r in rows if r.layer is not None})
    modules = sorted({r.module for r in rows})
    fig, ax = plt.subplots(figsize=(max(5, len(layers) * 0.45 + 2), 3.5))
    bottom = [0] * len(layers)
    for module in modules:
        counts = [sum(len(r.intruders) for r in rows if r.layer == layer and r.module == module) for layer in layers]
        ax.bar([str(x) for x in layers], counts, bottom=bottom, label=module)
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xlabel("layer")
    ax.set_ylabel(f"intruders (ε={epsilon:g})")
    ax.set_title("Intruder dimensions per layer")
    if modules:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sweep(plt: Any, rows: Sequence[MatrixIntruders], path: Path) -> None:
    keys = sorted({k for r in rows for k in r.sweep}, key=float)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([float(k) for k in keys], [sum(r.sweep.get(k, 0) for r in rows) for k in keys], marker="o")
    ax.set_xlabel("ε")
    ax.set_ylabel("intruders (all matrices)")
    ax.set_title("Intruder count against ε")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(folder: Path, rows: Sequence[MatrixIntruders], *, epsilon: float,
                select: str | None = None) -> list[str]:
    """Write the figures into ``folder`` (created); returns the files written."""
    plt = _pyplot()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{folder}: cannot create the plot folder ({exc.strerror or exc}); choose another --plot DIR."
        ) from None
    written = []
    for row in choose(rows, select):
        path = folder / f"similarity-{_safe(row.name)}.png"
        _similarity(plt, row, path, epsilon)
        written.append(str(path))
    for name, draw in (("intruders-per-layer.png", lambda p: _per_layer(plt, rows, p, epsilon)),
                       ("epsilon-sweep.png", lambda p: _sweep(plt, rows, p))):
        draw(folder / name)
        written.append(str(folder / name))
    return written
