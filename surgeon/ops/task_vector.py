"""Task vectors: τ = θ_tuned − θ_base in float32, rounding-only classification, rank statistics.

Definitions (DESIGN.md, "Task vector"):

* ``identical``: every element of θ_tuned equals θ_base (as values; NaN equals NaN).
* ``rounding_only``: not identical, and every element satisfies |τ| ≤ ½·ulp_d(|θ_base|),
  where d is the *stored dtype of the tuned tensor* (fp16 for an fp16-merged model,
  whatever the base dtype) and ulp_d(x) is the spacing of d's representable numbers in
  the binade of x (for x = 0 or in d's subnormal range, d's smallest subnormal spacing).
  Rounding x to nearest in d moves it by at most ½·ulp_d(x), so a tensor that was only
  cast to d (an fp16 merge of untouched weights) lands exactly in this class.
* ``changed``: anything else.

Rank statistics of a 2-D τ use its singular values with the standard tolerance
max(m, n)·eps_fp32·σ₁, the one ``torch.linalg.matrix_rank`` uses for a float32 matrix.
Exactly (``exact=True``: float64 Gram eigenvalues, see :func:`singular_values`), or from
the top of the spectrum by randomised SVD (:mod:`surgeon.ops.rsvd`), which is enough for
σ₁, the stable rank and the 90%/99% energy ranks whenever its bounds pin them down (else
the exact route decides). The numerical rank needs every σ_i above the tolerance: when
the part of τ outside the computed range is itself above it (the bf16 rounding noise of
a merged LoRA is), the count within the range is reported as a lower bound
(``numerical_rank_exact`` False).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from surgeon.ops.blas import numpy_blas_in_use, self_gram

IDENTICAL = "identical"
ROUNDING_ONLY = "rounding_only"
CHANGED = "changed"
STATUSES = (IDENTICAL, ROUNDING_ONLY, CHANGED)

# dtype -> (significand bits p including the implicit one, smallest normal exponent e_min)
_FLOAT_FORMATS: dict[torch.dtype, tuple[int, int]] = {
    torch.float16: (11, -14),
    torch.bfloat16: (8, -126),
    torch.float32: (24, -126),
    torch.float64: (53, -1022),
    torch.float8_e4m3fn: (4, -6),
    torch.float8_e5m2: (3, -14),
}
_CHUNK = 1 << 22  # elements per chunk in the ulp computation (16-32 MiB of temporaries)


def is_float_dtype(dtype: torch.dtype) -> bool:
    return dtype in _FLOAT_FORMATS


@torch.no_grad()
def task_vector(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """τ = tuned − base in float32 (same shape); 0 wherever the two values are equal.

    Equal infinities and NaN/NaN pairs give 0 rather than NaN, so a tensor that
    was copied unchanged is exactly zero.
    """
    t = tuned.to(torch.float32)
    b = base.to(torch.float32)
    delta = torch.sub(t, b)
    if bool(torch.isnan(delta).any()):  # NaN operands or inf − inf: equal values give 0
        delta.masked_fill_((t == b) | (torch.isnan(t) & torch.isnan(b)), 0.0)
    return delta


@torch.no_grad()
def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype``'s numbers at |x|, as float64 (same shape as ``x``).

    For |x| in [2^e, 2^(e+1)) the spacing is 2^(e − p + 1); below the smallest
    normal 2^e_min (and at 0) it is the subnormal spacing 2^(e_min − p + 1).
    """
    p, e_min = _FLOAT_FORMATS[dtype]
    _, exponent = torch.frexp(x.to(torch.float64).abs())  # |x| = m·2^exponent, m in [0.5, 1)
    exponent = torch.where(x == 0, torch.full_like(exponent, e_min + 1), exponent)
    exponent = exponent.clamp(min=e_min + 1)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), (exponent - p).to(torch.float64))


@dataclass(frozen=True)
class RoundingCheck:
    """How far τ is from zero in ulps of the stored dtype at θ_base.

    ``max_ulps``: max over elements of |τ| / ulp_d(θ_base); ``beyond``: number of
    elements with |τ| > ½ ulp (NaN counts as beyond).
    """

    max_ulps: float
    beyond: int


def abs_max(x: torch.Tensor) -> float:
    """max |x| (NaN if x holds one); aminmax is several times faster than abs().max()."""
    if x.numel() == 0:
        return 0.0
    low, high = torch.aminmax(x)
    return max(-float(low), float(high)) if not (torch.isnan(low) or torch.isnan(high)) else float("nan")


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent as float32, built from the bits (exponent int32 in [-126, 127])."""
    return ((exponent + 127) << 23).view(torch.float32)


@torch.no_grad()
def ulps_of(delta: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|delta| / ulp_dtype(|x|) as float32 (same shape), with exponent arithmetic only.

    ``x`` is float32 (or narrower). ulp_d(x) = 2^k with k = max(e(x), e_min) − (p − 1),
    e(x) the unbiased float32 exponent of |x| (−127 for 0 and float32 subnormals, which the
    clamp sends to d's subnormal spacing). The scaling by 2^−k is done as two exact
    power-of-two multiplications so that no factor overflows. 0/0 gives 0.
    """
    p, e_min = _FLOAT_FORMATS[dtype]
    bits = x.to(torch.float32).view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127
    neg_k = (p - 1) - exponent.clamp_(min=e_min)
    half = neg_k >> 1  # floor(neg_k / 2), also for negative neg_k
    out = delta.to(torch.float32).abs()
    out.mul_(_pow2(half)).mul_(_pow2(neg_k.sub_(half)))
    return out


@torch.no_grad()
def rounding_check(delta: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> RoundingCheck:
    """Compare τ (any shape, float32) with ½ ulp of ``dtype`` at θ_base, chunk by chunk.

    float16/bfloat16/float32/float8 use the float32 exponent path (:func:`ulps_of`); a
    float64 dtype or base uses the float64 reference (:func:`ulp`).
    """
    exact = dtype == torch.float64 or base.dtype == torch.float64
    flat_d = delta.reshape(-1)
    flat_b = base.reshape(-1)
    max_ulps = 0.0
    beyond = 0
    for start in range(0, flat_d.numel(), _CHUNK):
        d, b = flat_d[start : start + _CHUNK], flat_b[start : start + _CHUNK]
        if exact:
            ratio = (d.to(torch.float64).abs() / ulp(b, dtype)).masked_fill_(d == 0, 0.0)
        else:
            ratio = ulps_of(d, b, dtype)
        beyond += int((~(ratio <= 0.5)).sum())
        chunk_max = float(ratio.max()) if ratio.numel() else 0.0
        max_ulps = max(max_ulps, chunk_max if chunk_max == chunk_max else float("inf"))  # NaN -> inf
    return RoundingCheck(max_ulps=max_ulps, beyond=beyond)


@dataclass(frozen=True)
class DeltaMeasure:
    """One τ: its class, ‖τ‖_F, ‖θ_base‖_F, max |τ| and, when it was needed to decide the
    class, the elementwise comparison with ½ ulp (``max_ulps``/``beyond``; None when
    max |τ| > ½ ulp_d(max |θ_base|) already proves the tensor changed)."""

    status: str
    norm: float
    base_norm: float
    max_abs: float
    max_ulps: float | None
    beyond: int | None

    @property
    def relative(self) -> float | None:
        return self.norm / self.base_norm if self.base_norm > 0 else None


@torch.no_grad()
def measure_delta(
    tuned: torch.Tensor, base: torch.Tensor, rounding: torch.dtype | None
) -> tuple[torch.Tensor, DeltaMeasure]:
    """(τ float32, its measure) for two tensors of one shape.

    ``rounding`` is the dtype whose ½ ulp defines "rounding only" (normally the tuned
    tensor's stored dtype); None for non-float tensors, which are identical or changed.
    Few passes over the data: the elementwise ulp check runs only when the cheap bound
    max |τ| ≤ ½ ulp_d(max |θ_base|) leaves the class open.
    """
    b = base.to(torch.float32)
    delta = torch.sub(tuned.to(torch.float32), b)
    norm = float(torch.linalg.vector_norm(delta)) if delta.numel() else 0.0
    if not math.isfinite(norm):  # NaN/inf somewhere: make equal values (NaN/NaN, inf/inf) give 0
        delta = task_vector(tuned, base)
        norm = float(torch.linalg.vector_norm(delta))
    max_abs = abs_max(delta)
    base_norm = float(torch.linalg.vector_norm(b)) if b.numel() else 0.0
    if max_abs == 0.0:
        return delta, DeltaMeasure(IDENTICAL, 0.0, base_norm, 0.0, 0.0, 0)
    if rounding is None or not is_float_dtype(rounding):
        return delta, DeltaMeasure(CHANGED, norm, base_norm, max_abs, None, None)
    base_max = abs_max(b)
    bound = 0.5 * float(ulp(torch.tensor([base_max]), rounding)[0]) if math.isfinite(base_max) else math.inf
    if not max_abs <= bound:  # one element already beyond ½ ulp at the largest |θ_base|; NaN lands here too
        return delta, DeltaMeasure(CHANGED, norm, base_norm, max_abs, None, None)
    check = rounding_check(delta, b, rounding)
    status = ROUNDING_ONLY if check.beyond == 0 else CHANGED
    return delta, DeltaMeasure(status, norm, base_norm, max_abs, check.max_ulps, check.beyond)


@dataclass(frozen=True)
class RankStats:
    """Spectral summary of a 2-D τ (out × in).

    ``numerical_rank``: #σ_i > tolerance = max(m, n)·eps_fp32·σ₁ (a lower bound when
    ``numerical_rank_exact`` is False); ``method``: "exact" or "randomized"; ``stable_rank``:
    ‖τ‖_F² / σ₁²; ``rank_90`` / ``rank_99``: smallest k with Σ_{i≤k} σ_i² ≥ 0.90 / 0.99·‖τ‖_F².
    """

    numerical_rank: int
    stable_rank: float
    rank_90: int
    rank_99: int
    sigma_max: float
    tolerance: float
    numerical_rank_exact: bool = True
    method: str = "exact"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def energy_rank(singular_values: torch.Tensor, fraction: float) -> int:
    """Smallest k whose top-k singular values hold ``fraction`` of Σσ² (0 for a zero matrix)."""
    energy = singular_values.to(torch.float64) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    # the last cumulative value can round to just under 1; never ask for more than all of it
    k = int(torch.searchsorted(cumulative, torch.tensor([min(fraction, 1.0) - 1e-12], dtype=torch.float64))[0]) + 1
    return min(k, singular_values.numel())


@torch.no_grad()
def gram(delta: torch.Tensor, *, device: str | torch.device | None = None, block: int = 4096) -> torch.Tensor:
    """float64 Gram matrix of the shorter side of a 2-D ``delta`` (m × n): τᵀτ (n × n) when
    m ≥ n, else ττᵀ (m × m), accumulated over blocks of ``block`` rows (or columns) so that
    only one block is ever held in float64."""
    m, n = delta.shape
    tall = m >= n
    on_cpu = torch.device(device).type == "cpu" if device is not None else delta.device.type == "cpu"
    if (m if tall else n) <= block and on_cpu and numpy_blas_in_use():  # one block: OpenBLAS's SYRK on it
        whole = delta.to(device="cpu", dtype=torch.float64)
        fast = self_gram(whole.T if tall else whole)  # τᵀτ for a square τ too (self_gram's own choice: ττᵀ)
        if fast is not None:
            return fast
    out = torch.zeros(n if tall else m, n if tall else m, dtype=torch.float64, device=device)
    for start in range(0, m if tall else n, block):
        part = delta[start : start + block] if tall else delta[:, start : start + block]
        part = part.to(device=device, dtype=torch.float64)
        if tall:
            out.addmm_(part.T, part)
        else:
            out.addmm_(part, part.T)
    return out


@torch.no_grad()
def singular_values(delta: torch.Tensor, *, device: str | torch.device | None = None) -> torch.Tensor:
    """All min(m, n) singular values of a 2-D ``delta``, descending, float64 on CPU.

    √eig of the float64 :func:`gram` matrix: squaring in float64 puts the error floor
    near √eps_fp64·σ₁ ≈ 1.5e-8·σ₁, far below the rank tolerance max(m, n)·eps_fp32·σ₁,
    at a fraction of an SVD's cost.
    """
    eigenvalues = torch.linalg.eigvalsh(gram(delta, device=device))  # ascending
    return eigenvalues.flip(0).clamp_min(0.0).sqrt().to("cpu")


@torch.no_grad()
def rank_stats(delta: torch.Tensor, *, device: str | torch.device | None = None, exact: bool = False,
               randomized_from: int = 256) -> RankStats:
    """Rank statistics of a 2-D τ (out × in, any float dtype): randomised where its bounds decide (min(m, n) >
    ``randomized_from``; smaller ones are as cheap exactly), else exact."""
    if not exact and min(delta.shape) > randomized_from:
        found = _randomized_stats(delta, device)
        if found is not None:
            return found
    m, n = delta.shape
    s = singular_values(delta, device=device)
    sigma_max = float(s[0]) if s.numel() else 0.0
    tolerance = max(m, n) * torch.finfo(torch.float32).eps * sigma_max
    if sigma_max == 0.0:
        return RankStats(0, 0.0, 0, 0, 0.0, 0.0)
    return RankStats(
        numerical_rank=int((s > tolerance).sum()),
        stable_rank=float((s**2).sum()) / sigma_max**2,
        rank_90=energy_rank(s, 0.90),
        rank_99=energy_rank(s, 0.99),
        sigma_max=sigma_max,
        tolerance=tolerance,
    )


def _randomized_stats(delta: torch.Tensor, device: str | torch.device | None) -> RankStats | None:
    """The statistics from the top of the spectrum, or None where the bounds leave one of the energy ranks open."""
    from surgeon.ops import rsvd

    m, n = delta.shape
    profile = rsvd.randomized_profile(delta.to(device), energy=0.99, norm_steps=0)
    if profile is None or profile.total == 0.0:
        return None
    ranks = [profile.energy_ranks(f) for f in (0.90, 0.99)]
    if any(lo != hi for lo, hi in ranks):
        return None
    s = profile.s.to("cpu")
    sigma_max = float(s[0])
    tolerance = max(m, n) * torch.finfo(torch.float32).eps * sigma_max
    above = int((s > tolerance).sum())
    tail = profile.tail_norm
    ambiguous = bool(((s <= tolerance) & ((s**2 + tail**2).sqrt() > tolerance)).any())
    exact_count = tail < tolerance and not ambiguous  # nothing outside the range reaches the tolerance
    return RankStats(
        numerical_rank=above, stable_rank=profile.total / sigma_max**2, rank_90=ranks[0][1], rank_99=ranks[1][1],
        sigma_max=sigma_max, tolerance=tolerance, numerical_rank_exact=exact_count, method="randomized",
    )
