"""What `surgeon intruders` is asked and what it finds, per matrix and in total (shared by the spectral workflows and their plots)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from surgeon.errors import OptionError
from surgeon.ops import intruders as ops
from surgeon.ops import svd
from surgeon.ops.targets import Target
from surgeon.workflows.spectral.choices import SIDES

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class IntruderOptions:
    """``epsilon``: threshold on c_j; ``top_k``: tuned directions examined; ``side``: left (the
    paper's), right, or both (an intruder on both sides); ``method``: auto, krylov or dense;
    ``plot_base``: base vectors kept per matrix for the similarity plot."""

    epsilon: float = 0.5
    top_k: int = 10
    side: str = "left"
    method: str = "auto"
    tol: float = svd.DEFAULT_TOL
    plot_base: int = 100

    def check(self) -> None:
        if not 0 < self.epsilon <= 1:
            raise OptionError(f"--epsilon {self.epsilon}: a cosine threshold must be in (0, 1]; the paper uses 0.5.")
        if self.top_k < 1:
            raise OptionError(f"--top-k {self.top_k}: examine at least one singular vector (the paper uses 10).")
        if self.side not in SIDES:
            raise OptionError(f"--side {self.side!r}: use left (the paper's definition), right or both.")
        if self.method not in svd.METHODS:
            raise OptionError(f"--method {self.method!r}: use {', '.join(svd.METHODS)}.")


@dataclass(frozen=True)
class MatrixIntruders:
    """One matrix. Ranks are 1-based (rank 1 = σ₁); ``match_left[j]`` is the 1-based rank of the
    base vector closest to u_j. ``status`` "unchanged": W_t == W₀ bit for bit, not decomposed."""

    name: str
    layer: int | None
    module: str
    shape: list[int]
    transposed: bool
    status: str
    sigma: list[float]
    cos_left: list[float] | None
    cos_right: list[float] | None
    match_left: list[int] | None
    intruders: list[int]
    intruder_sigma: list[float]
    energy_share: float
    baseline_left: float | None
    baseline_right: float | None
    sweep: dict[str, int]
    method: str
    steps: int
    residual: float
    cache: str
    seconds: float
    similarity: np.ndarray | None = field(default=None, compare=False, repr=False)  # top-k × top-N |U_tᵀU₀|

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "similarity"}

    @property
    def decisive(self) -> list[float]:
        """The cosines the intruder test used: c_j of the side asked for (both: the larger of the two)."""
        if self.cos_left is not None and self.cos_right is not None:
            return [max(a, b) for a, b in zip(self.cos_left, self.cos_right)]
        return self.cos_left or self.cos_right or []


@dataclass(frozen=True)
class SideCosines:
    """One side's comparison with the base: c_j per tuned vector, the 1-based rank of the closest base
    vector (left side only, for the report) and the random baseline of c_j for that dimension."""

    cos: list[float]
    match: list[int] | None
    baseline: float


@dataclass(frozen=True)
class Decomposition:
    """How a matrix's top-k was found: the route (:attr:`svd.Triplets.method`, or "unchanged"), its
    steps and checked residual, the base cache's state ("hit", "miss", "off", "-") and the seconds taken."""

    method: str
    steps: int
    residual: float
    cache: str
    seconds: float

    @classmethod
    def unchanged(cls, seconds: float) -> Decomposition:
        return cls("unchanged", 0, 0.0, "-", seconds)


def build_row(target: Target, how: Decomposition, *, sigma: Sequence[float] = (), epsilon: float = 0.5,
              left: SideCosines | None = None, right: SideCosines | None = None,
              similarity: np.ndarray | None = None) -> MatrixIntruders:
    """The one place a :class:`MatrixIntruders` is made: the decisive c_j (both sides: the larger),
    the intruder ranks at ``epsilon``, their σ and energy share and the ε sweep; no side: unchanged."""
    sigma = [float(x) for x in sigma]
    if left is None and right is None:
        return MatrixIntruders(
            name=target.name, layer=target.layer, module=target.module, shape=list(target.linear_shape),
            transposed=target.transposed, status="unchanged", sigma=[], cos_left=None, cos_right=None,
            match_left=None, intruders=[], intruder_sigma=[], energy_share=0.0, baseline_left=None,
            baseline_right=None, sweep={}, method=how.method, steps=how.steps, residual=how.residual,
            cache=how.cache, seconds=how.seconds)
    if left is not None and right is not None:
        decisive = [max(a, b) for a, b in zip(left.cos, right.cos)]
    else:
        decisive = (left or right).cos  # type: ignore[union-attr]
    ranks = ops.intruder_ranks(decisive, epsilon)
    return MatrixIntruders(
        name=target.name, layer=target.layer, module=target.module, shape=list(target.linear_shape),
        transposed=target.transposed, status="analysed", sigma=sigma,
        cos_left=left.cos if left else None, cos_right=right.cos if right else None,
        match_left=left.match if left else None, intruders=ranks, intruder_sigma=[sigma[j - 1] for j in ranks],
        energy_share=ops.energy_share(sigma, ranks), baseline_left=left.baseline if left else None,
        baseline_right=right.baseline if right else None, sweep=ops.sweep(decisive), method=how.method,
        steps=how.steps, residual=how.residual, cache=how.cache, seconds=how.seconds, similarity=similarity)


@dataclass(frozen=True)
class IntrudersReport:
    tuned: str | None
    base: str
    adapter: str | None
    targets: str
    epsilon: float
    top_k: int
    side: str
    device: str
    matrices: list[MatrixIntruders]
    totals: dict[str, Any]
    cache: dict[str, Any]
    methods: dict[str, int]
    plots: list[str]
    seconds: float
    world_size: int = 1
    computed_by_rank: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        owners = body.pop("computed_by_rank") or [0] * len(self.matrices)
        body["matrices"] = [{**m.to_dict(), "computed_by_rank": rank} for m, rank in zip(self.matrices, owners)]
        return body


def row_to_wire(row: MatrixIntruders) -> dict[str, Any]:
    """A row as JSON-able data, similarity matrix included (for the gather of a distributed run)."""
    sim = row.similarity
    return {**row.to_dict(), "similarity": None if sim is None else {"dtype": str(sim.dtype), "rows": sim.tolist()}}


def row_from_wire(data: dict[str, Any]) -> MatrixIntruders:
    import numpy

    body = dict(data)
    sim = body.pop("similarity")
    return MatrixIntruders(**body, similarity=None if sim is None else numpy.asarray(sim["rows"], dtype=sim["dtype"]))
