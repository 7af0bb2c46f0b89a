"""PNG figures from plain numbers (matplotlib, imported only when a figure is drawn).

Every function takes the output path first and the data as lists or arrays,
draws one figure and closes it. Colours, sizes and labels are the caller's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from surgeon.errors import OutputError

LORA_COLOR, FULL_COLOR, BASE_COLOR = "#2f6fb0", "#d0672f", "#6b6b6b"


class PlottingUnavailableError(OutputError):
    """matplotlib is not installed."""


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a one-line error saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlottingUnavailableError(
            "drawing figures needs matplotlib, which is not installed; pip install surgeon[plot]") from None
    return plt


def _save(plt: Any, fig: Any, path: Path, dpi: int | None = None) -> None:
    fig.tight_layout()
    fig.savefig(path, **({"dpi": dpi} if dpi else {}))
    plt.close(fig)


def bars(path: Path, categories: Sequence[str], series: Sequence[tuple[str, Sequence[float], str | None]], *,
         stacked: bool, xlabel: str, ylabel: str, title: str, size: tuple[float, float] | None = None,
         dpi: int = 110, integer: bool = False, clean: bool = False) -> None:
    """Bars per category, one series per (label, values, colour): side by side, or stacked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=size or (max(5, len(categories) * 0.45 + 2), 3.5), dpi=dpi)
    xs = list(range(len(categories)))
    if stacked:
        bottom = [0.0] * len(categories)
        for label, values, color in series:
            ax.bar(list(categories), list(values), bottom=bottom, label=label, color=color)
            bottom = [b + c for b, c in zip(bottom, values)]
    else:
        width = 0.76 / max(1, len(series))
        for i, (label, values, color) in enumerate(series):
            offset = (i - (len(series) - 1) / 2) * width
            ax.bar([x + offset for x in xs], list(values), width, label=label, color=color)
        ax.set_xticks(xs, list(categories))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if integer:
        ax.yaxis.get_major_locator().set_params(integer=True)
    if series:
        ax.legend(frameon=not clean, fontsize=7 if stacked else 9, ncol=2 if stacked else 1)
    if clean:
        ax.spines[["top", "right"]].set_visible(False)
    _save(plt, fig, path)


def lines(path: Path, series: Sequence[tuple[str, Sequence[float], Sequence[float], str | None]], *,
          xlabel: str, ylabel: str, title: str, size: tuple[float, float] = (4.5, 3.2), dpi: int = 110,
          vline: float | None = None, clean: bool = False, integer_x: bool = False) -> None:
    """One line with markers per (label, xs, ys, colour); an optional dotted vertical marker at ``vline``;
    ``integer_x``: ticks only at whole numbers (layers, stages)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    for label, xs, ys, color in series:
        ax.plot(list(xs), list(ys), "o-", color=color, label=label)
    if vline is not None:
        ax.axvline(vline, color=BASE_COLOR, lw=0.8, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if integer_x:
        ax.xaxis.get_major_locator().set_params(integer=True)
    if len(series) > 1:
        ax.legend(frameon=False, fontsize=9)
    if clean:
        ax.spines[["top", "right"]].set_visible(False)
    _save(plt, fig, path)


def similarity(path: Path, sim: Any, marked_rows: Sequence[int], *, title: str, xlabel: str, ylabel: str,
               mark: str = "intruder") -> None:
    """Heat-map of a k × N matrix in [0, 1] (ranks from 1 on both axes), rows in ``marked_rows`` labelled ``mark``."""
    plt = pyplot()
    k, n = sim.shape
    fig, ax = plt.subplots(figsize=(min(12, 2 + n / 10), 3.2))
    image = ax.imshow(sim, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest",
                      extent=(0.5, n + 0.5, k + 0.5, 0.5))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yticks(range(1, k + 1))
    for j in marked_rows:
        ax.annotate(mark, (n + 0.3, j), color="red", fontsize=7, ha="right", va="center")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    _save(plt, fig, path, dpi=110)


def tradeoff(path: Path, lambdas: Sequence[float], accuracy: Sequence[float], drift: Sequence[float], *,
             references: Mapping[str, tuple[float, float, str]]) -> None:
    """Left: accuracy (%) and drift against λ. Right: accuracy against drift, one point per λ, plus
    reference models as {label: (drift, accuracy %, colour)}."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.0, 3.6), dpi=110)
    ax1.plot(list(lambdas), list(accuracy), "o-", color=LORA_COLOR, label="task accuracy")
    ax1.set_xlabel("\u03bb (intruder singular values scaled by \u03bb)")
    ax1.set_ylabel("task accuracy (%)", color=LORA_COLOR)
    ax1b = ax1.twinx()
    ax1b.plot(list(lambdas), list(drift), "s--", color=FULL_COLOR, label="embedding drift")
    ax1b.set_ylabel("drift from base (1 \u2212 cos)", color=FULL_COLOR)
    ax1.set_title("LoRA model as \u03bb varies", fontsize=10)
    ax2.plot(list(drift), list(accuracy), "o-", color=LORA_COLOR, label="LoRA, scaled intruders")
    for i, (x, y, lm) in enumerate(zip(drift, accuracy, lambdas)):
        ax2.annotate(f"\u03bb={lm:g}", (x, y), textcoords="offset points", xytext=(4, 6 if i % 2 else -12), fontsize=8)
    for label, (x, y, color) in references.items():
        ax2.plot([x], [y], "D", color=color, label=label)
    ax2.set_xlabel("forgetting: embedding drift from base (1 \u2212 cos)")
    ax2.set_ylabel("task accuracy (%)")
    ax2.set_title("Accuracy vs forgetting", fontsize=10)
    ax2.legend(frameon=True, framealpha=0.9, fontsize=8, loc="best")
    for ax in (ax1, ax2):
        ax.spines[["top"]].set_visible(False)
    _save(plt, fig, path)


PALETTE = (LORA_COLOR, FULL_COLOR, "#3a9a5b", "#8a4fb3", "#b8a02a", "#3aa3b8", "#c44e88", BASE_COLOR)


def spectra(path: Path, series: Sequence[tuple[str, Sequence[float], str | None, Sequence[int]]], *, title: str,
            xlabel: str = "rank", ylabel: str = "singular value", size: tuple[float, float] = (5.2, 3.2),
            dpi: int = 110, log: bool = True) -> None:
    """Singular values against rank (from 1), one line per (label, values, colour, marked ranks);
    marked ranks (1-based) are drawn as hollow red circles (intruders)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    for label, values, color, marked in series:
        xs = list(range(1, len(values) + 1))
        ax.plot(xs, list(values), ".-", color=color, label=label, lw=1.2, ms=4)
        hits = [(j, values[j - 1]) for j in marked if 0 < j <= len(values)]
        if hits:
            ax.plot([j for j, _ in hits], [v for _, v in hits], "o", mfc="none", mec="#b3261e", ms=8, mew=1.4)
    if log and all(v > 0 for _, values, _, _ in series for v in values):
        ax.set_yscale("log")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if series:
        ax.legend(frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    _save(plt, fig, path)
