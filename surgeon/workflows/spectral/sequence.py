"""`surgeon intruders STAGE1 STAGE2 ... --base BASE --sequence`: intruders across continual stages.

The TUNED are the stages of one continual run, in order (stage 1 = the first). Each
stage is analysed as by `surgeon intruders` (one shared base cache, so each base matrix
is decomposed once), keeping the intruders' left singular vectors. Per matrix, an
intruder of stage s *persists* when it matches an intruder of stage s − 1 (|cos| of the
two left singular vectors ≥ ``match``, default 0.9, greedy one to one from the best
pair); it then keeps the stage it was born in. An unmatched one is *new* (born at s);
an intruder of stage s − 1 left unmatched has *vanished* at s. ``cumulative`` counts the
intruders ever born up to s. An intruder counts for every ε above its c_j, so c_j is the
ε at which it would stop counting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from surgeon.errors import OptionError
from surgeon.ops.targets import DEFAULT_PRESET
from surgeon.workflows.merge.run import pick_device
from surgeon.workflows.spectral.intruders import analyse_stream, open_inputs, totals
from surgeon.workflows.spectral.multi import ManyReport, SharedCache, check_tuned, hide_cache_dir, sum_cache
from surgeon.workflows.spectral.results import IntruderOptions, IntrudersReport
from surgeon.workflows.spectral.spectrum import open_cache, resolve_targets

DEFAULT_MATCH = 0.9


@dataclass(frozen=True)
class StageIntruder:
    """One intruder at one stage: ``rank`` (1-based) in that stage's matrix, the stage it was
    ``born`` in, its c_j (``stops_at_epsilon``: it counts only for ε above this), σ_j, and the
    |cos| with the intruder of the previous stage it continues (None when new)."""

    matrix: str
    rank: int
    born: int
    stops_at_epsilon: float
    sigma: float
    match: float | None


@dataclass(frozen=True)
class Vanished:
    """An intruder of the previous stage with no match at this one."""

    matrix: str
    rank: int
    born: int


@dataclass(frozen=True)
class StageView:
    stage: int
    model: str
    intruders: int
    new: int
    persisting: int
    vanished: int
    cumulative: int
    born: dict[str, int]
    items: list[StageIntruder]
    gone: list[Vanished]


@dataclass(frozen=True)
class SequenceReport:
    match: float
    stages: list[StageView]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def born_at_or_after(self, stage: int) -> dict[str, list[int]]:
        """{matrix: ranks} of the last stage's intruders born at ``stage`` or later."""
        out: dict[str, list[int]] = {}
        for item in self.stages[-1].items:
            if item.born >= stage:
                out.setdefault(item.matrix, []).append(item.rank)
        return out


# -- matching (pure) --------------------------------------------------------------------------------
@dataclass
class _Alive:
    rank: int
    born: int
    vector: torch.Tensor


def match_pairs(previous: torch.Tensor, current: torch.Tensor, threshold: float) -> list[tuple[int, int, float]]:
    """Greedy one-to-one pairs (i, j, |cos|) between the columns of ``previous`` (m × p) and
    ``current`` (m × c), best pair first, while |cos| ≥ ``threshold``. Columns are unit vectors."""
    if previous.numel() == 0 or current.numel() == 0:
        return []
    cos = (previous.T.to(torch.float64) @ current.to(torch.float64)).abs()
    pairs: list[tuple[int, int, float]] = []
    while True:
        best = float(cos.max())
        if best < threshold:
            return pairs
        flat = int(cos.argmax())
        i, j = divmod(flat, cos.shape[1])
        pairs.append((i, j, best))
        cos[i, :] = -1.0
        cos[:, j] = -1.0


def _advance(name: str, alive: list[_Alive], ranks: list[int], cosines: list[float], sigma: list[float],
             vectors: torch.Tensor | None, stage: int, threshold: float
             ) -> tuple[list[_Alive], list[StageIntruder], list[Vanished]]:
    """One matrix from stage − 1 to ``stage``: who persists, who is new, who vanished."""
    prev = torch.stack([a.vector for a in alive], 1) if alive else torch.empty(0)
    cur = vectors if vectors is not None and ranks else torch.empty(0)
    pairs = {j: (i, c) for i, j, c in match_pairs(prev, cur, threshold)}
    now: list[_Alive] = []
    items: list[StageIntruder] = []
    for j, rank in enumerate(ranks):
        i, c = pairs.get(j, (None, None))
        born = alive[i].born if i is not None else stage
        now.append(_Alive(rank, born, cur[:, j].clone()))
        items.append(StageIntruder(name, rank, born, cosines[rank - 1], sigma[rank - 1], c))
    kept = {i for i, _ in pairs.values()}
    gone = [Vanished(name, a.rank, a.born) for i, a in enumerate(alive) if i not in kept]
    return now, items, gone


# -- the workflow --------------------------------------------------------------------------------------
def _analyse_stage(path: str | os.PathLike[str], base: str | os.PathLike[str], *, targets: str,
                   options: IntruderOptions, device: str, cache: str | os.PathLike[str] | None
                   ) -> tuple[IntrudersReport, dict[str, torch.Tensor]]:
    """The stage's one-model report (as :func:`find_intruders` gives) and its intruders' u_j (m × |I|)."""
    begin = time.perf_counter()
    dev = pick_device(device)
    store = open_cache(cache, enabled=True)
    counts = {"hits": 0, "misses": 0, "computed": 0}
    vectors: dict[str, torch.Tensor] = {}
    rows = []
    with open_inputs(path, base, None) as inputs:
        chosen = resolve_targets(inputs.base, targets, what=str(base))
        for a in analyse_stream(inputs, chosen, options, store, dev, counts, desc=f"intruders {Path(str(path)).name}"):
            rows.append(a.row)
            if a.row.intruders and a.triplets is not None:
                idx = torch.tensor([r - 1 for r in a.row.intruders])
                vectors[a.row.name] = a.triplets.u[:, idx].to("cpu", torch.float64)
        tuned_arg, adapter_arg = inputs.tuned_path, inputs.adapter_path
    methods: dict[str, int] = {}
    for row in rows:
        methods[row.method] = methods.get(row.method, 0) + 1
    report = IntrudersReport(
        str(tuned_arg) if tuned_arg is not None else None, str(base),
        str(adapter_arg) if adapter_arg is not None else None, targets, options.epsilon, options.top_k,
        options.side, str(dev), rows, totals(rows), {"dir": str(store.root) if store.root else None, **counts},
        methods, [], time.perf_counter() - begin)
    return report, vectors


def track(reports: Sequence[IntrudersReport], vectors: Sequence[dict[str, torch.Tensor]], *,
          match: float = DEFAULT_MATCH, names: Sequence[str] | None = None) -> SequenceReport:
    """The sequence view from each stage's report and intruder vectors (stages in order)."""
    alive: dict[str, list[_Alive]] = {}
    stages: list[StageView] = []
    ever = 0
    for s, (report, vecs) in enumerate(zip(reports, vectors), 1):
        items: list[StageIntruder] = []
        gone: list[Vanished] = []
        seen = set()
        for row in report.matrices:
            seen.add(row.name)
            now, its, lost = _advance(row.name, alive.get(row.name, []), list(row.intruders), row.decisive,
                                      row.sigma, vecs.get(row.name), s, match)
            alive[row.name] = now
            items += its
            gone += lost
        for name in [n for n in alive if n not in seen]:  # a matrix the stage no longer selects
            gone += [Vanished(name, a.rank, a.born) for a in alive.pop(name)]
        new = sum(1 for i in items if i.born == s)
        ever += new
        born: dict[str, int] = {}
        for i in items:
            born[str(i.born)] = born.get(str(i.born), 0) + 1
        label = names[s - 1] if names is not None else (report.tuned or report.adapter or f"stage {s}")
        stages.append(StageView(s, label, len(items), new, len(items) - new, len(gone), ever,
                                dict(sorted(born.items(), key=lambda kv: int(kv[0]))), items, gone))
    return SequenceReport(match, stages)


def check_match(match: float) -> None:
    if not 0 < match <= 1:
        raise OptionError(f"--match {match}: a |cos| threshold must be in (0, 1]; the default is {DEFAULT_MATCH}.")


def find_intruders_sequence(
    stages: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    *,
    targets: str = DEFAULT_PRESET,
    options: IntruderOptions = IntruderOptions(),
    match: float = DEFAULT_MATCH,
    device: str = "auto",
    cache: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> ManyReport:
    """Every stage's intruders against BASE and the sequence view (new / persisting / vanished)."""
    options.check()
    check_tuned(stages, adapter=None)
    check_match(match)
    if len(stages) < 2:
        raise OptionError(f"--sequence needs at least two stages (TUNED in the order trained); got {len(stages)}.")
    begin = time.perf_counter()
    reports: list[IntrudersReport] = []
    vectors: list[dict[str, torch.Tensor]] = []
    with SharedCache(cache, use_cache=use_cache) as shared:
        for path in stages:
            report, vecs = _analyse_stage(path, base, targets=targets, options=options, device=device,
                                          cache=shared.path)
            reports.append(report)
            vectors.append(vecs)
        root = Path(reports[0].cache["dir"]) if use_cache and reports[0].cache.get("dir") else None
    if not use_cache:
        reports = [hide_cache_dir(r) for r in reports]
    view = track(reports, vectors, match=match, names=[str(p) for p in stages])
    return ManyReport(str(base), reports, sum_cache(reports, root), view, time.perf_counter() - begin)
