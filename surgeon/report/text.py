"""Number formatting shared by the pages and the CLI summaries."""

from __future__ import annotations


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, digits: int = 4) -> str:
    """A number with ``digits`` significant digits, in scientific notation when very small or large."""
    if x is None:
        return "n/a"
    if x == 0:
        return "0"  # also -0.0
    if abs(x) < 10 ** -(digits - 1) or abs(x) >= 1e5:
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def drift_text(x: float | None) -> str:
    """Embedding drift (1 - mean cosine) with four decimals."""
    return "n/a" if x is None else f"{x:.4f}"


def secs(x: float | None) -> str:
    """A duration: seconds below two minutes, else minutes and seconds."""
    return "n/a" if x is None else (f"{x:.1f} s" if x < 120 else f"{int(x // 60)} min {x % 60:.0f} s")
