"""`surgeon intruders TUNED... --base BASE`: several fine-tunes of one base, side by side.

A layer on top of :func:`find_intruders`: each TUNED (a checkpoint or an adapter folder,
mixed freely) is analysed in the order given, all against one base-decomposition cache, so
each base matrix is decomposed once (the first model's misses are every later model's
hits). With ``--no-cache`` the cache is a temporary folder that lives for this call only:
nothing is written where the user would find it, and the base is still decomposed once.
Each model's entry is exactly the one-model report (``models[i].totals`` ...).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from surgeon.errors import OptionError
from surgeon.ops.targets import DEFAULT_PRESET
from surgeon.parallel.world import SOLO, World
from surgeon.workflows.spectral.intruders import find_intruders
from surgeon.workflows.spectral.results import IntruderOptions, IntrudersReport


@dataclass(frozen=True)
class ManyReport:
    """One :class:`IntrudersReport` per TUNED (in order), the cache counts summed, and the
    sequence view (:class:`surgeon.workflows.spectral.sequence.SequenceReport`) when asked."""

    base: str
    models: list[IntrudersReport]
    cache: dict[str, Any]
    sequence: Any | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "models": [m.to_dict() for m in self.models], "cache": self.cache,
                "sequence": self.sequence.to_dict() if self.sequence is not None else None, "seconds": self.seconds}


def model_label(path: str | os.PathLike[str], index: int) -> str:
    """A short name for TUNED number ``index`` (0-based) in tables and pages."""
    name = Path(str(path)).name or str(path)
    return f"{index + 1}: {name}"


def check_tuned(tuned: Sequence[str | os.PathLike[str]], *, adapter: str | os.PathLike[str] | None) -> None:
    if not tuned:
        raise OptionError("no fine-tune given: pass one or more TUNED (checkpoints or adapter folders).")
    if adapter is not None and len(tuned) > 1:
        raise OptionError(f"--adapter with {len(tuned)} TUNED: --adapter applies to one model; give each "
                           "adapter folder as a TUNED argument instead.")


def sum_cache(reports: Sequence[IntrudersReport], root: Path | None) -> dict[str, Any]:
    """The base cache's hits and misses over all models (``misses`` = base matrices decomposed)."""
    out: dict[str, Any] = {"dir": str(root) if root is not None else None}
    for key in ("hits", "misses", "computed"):
        out[key] = sum(int(r.cache.get(key, 0)) for r in reports)
    return out


class SharedCache:
    """The cache folder for a multi-model call: the user's, or a temporary one with ``--no-cache``."""

    def __init__(self, cache: str | os.PathLike[str] | None, *, use_cache: bool) -> None:
        self._tmp = None if use_cache else tempfile.TemporaryDirectory(prefix="surgeon-svd-")
        self.path: str | os.PathLike[str] | None = cache if use_cache else self._tmp.name  # type: ignore[union-attr]

    def __enter__(self) -> SharedCache:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _plot_dir(plot: str | os.PathLike[str] | None, tuned: str | os.PathLike[str], index: int) -> Path | None:
    if plot is None:
        return None
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(tuned)).name).strip("._") or "model"
    return Path(plot) / f"{index + 1}-{stem}"


def find_intruders_many(
    tuned: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    *,
    targets: str = DEFAULT_PRESET,
    options: IntruderOptions = IntruderOptions(),
    device: str = "auto",
    cache: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    plot: str | os.PathLike[str] | None = None,
    plot_matrices: str | None = None,
    world: World = SOLO,
) -> ManyReport:
    """:func:`find_intruders` for every TUNED against BASE, one shared base cache.

    ``plot``: figures of model i go to ``plot/<i>-<name>/``.
    """
    check_tuned(tuned, adapter=None)
    begin = time.perf_counter()
    reports: list[IntrudersReport] = []
    with SharedCache(cache, use_cache=use_cache) as shared:
        for i, path in enumerate(tuned):
            report = find_intruders(path, base, targets=targets, options=options, device=device, cache=shared.path,
                                    use_cache=True, plot=_plot_dir(plot, path, i), plot_matrices=plot_matrices,
                                    world=world)
            reports.append(report if use_cache else hide_cache_dir(report))
        root = Path(reports[0].cache["dir"]) if use_cache and reports[0].cache.get("dir") else None
    return ManyReport(str(base), reports, sum_cache(reports, root), None, time.perf_counter() - begin)


def hide_cache_dir(report: IntrudersReport) -> IntrudersReport:
    """A report whose cache was the call's temporary folder: say so instead of naming a deleted path."""
    return replace(report, cache={**report.cache, "dir": None, "temporary": True})
