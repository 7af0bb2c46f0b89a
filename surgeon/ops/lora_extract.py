"""LoRA factors of a weight delta by truncated SVD.

For τ (out × in) = U·S·Vᵀ, the rank-k factors are B = U_k·√S_k (out × k) and
A = √S_k·V_kᵀ (k × in), so that B·A is the best rank-k approximation of τ
(Eckart–Young) and, with alpha = k, PEFT's scaling alpha/r is 1.

The decomposition comes from the float64 Gram matrix of the shorter side (an
eigendecomposition of n × n instead of an SVD of out × in): with V_k from
τᵀτ = V·S²·Vᵀ, U_k·S_k = τ·V_k, so B = τ·V_k/√S_k and A = √S_k·V_kᵀ (and the
mirror image when out < in). In float64 this is accurate far beyond float32. That is the ``exact`` route.

By default the top of τ's spectrum comes from a randomised SVD (:mod:`surgeon.ops.rsvd`):
a range of k + oversampling columns, power iterations until the top-k energy is
stationary, a posteriori bounds; a few passes over τ instead of its Gram matrix and an
eigendecomposition. An energy target whose rank the bounds do not pin down, a range
wider than a quarter of min(m, n), or a matrix with min(m, n) ≤ 512 takes the exact route.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.ops import rsvd
from surgeon.ops.blas import symmetric_top
from surgeon.ops.task_vector import energy_rank, gram

RANDOMIZED_FROM = 512  # min(m, n) up to this: the Gram eigendecomposition is as cheap as the passes, and exact


@dataclass(frozen=True)
class LoraFactors:
    """A (k × in) and B (out × k), float32 on CPU; errors relative to ‖τ‖_F.

    ``relative_error`` = ‖τ − B·A‖_F / ‖τ‖_F (measured, not inferred from σ);
    ``energy`` = share of ‖τ‖² the factors hold; ``singular_values``: all of them (float64) on the
    exact route, the computed top on the randomised one; ``method``: "exact" or "randomized";
    ``bound``: guaranteed ratio of the error to the optimal rank-k error (1 when exact, inf when
    the a posteriori bound is not informative); ``passes``: products with τ or τᵀ.
    """

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    relative_error: float
    energy: float
    singular_values: torch.Tensor
    method: str = "exact"
    bound: float = 1.0
    passes: int = 0


def choose_rank(
    singular_values: torch.Tensor, *, rank: int | None = None, energy: float | None = None, max_rank: int | None = None
) -> int:
    """k from a fixed ``rank`` (clipped to min(m, n)) or the smallest k holding ``energy`` of Σσ².

    Exactly one of ``rank`` / ``energy`` is given; ``max_rank`` caps the result.
    A zero matrix has rank 0.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    full = singular_values.numel()
    if full == 0 or float(singular_values.abs().max()) == 0.0:
        return 0
    k = min(rank, full) if rank is not None else energy_rank(singular_values, float(energy))  # type: ignore[arg-type]
    if max_rank is not None:
        k = min(k, max_rank)
    return k


def _project(delta: torch.Tensor, basis: torch.Tensor, *, tall: bool, device: str | torch.device | None,
             block: int = 4096) -> torch.Tensor:
    """τ·basis (out × k) when ``tall``, else basisᵀ·τ (k × in); float64, in blocks of τ."""
    m, n = delta.shape
    k = basis.shape[1]
    out = torch.empty((m, k) if tall else (k, n), dtype=torch.float64, device=device)
    for start in range(0, m if tall else n, block):
        if tall:
            out[start : start + block] = delta[start : start + block].to(device, torch.float64) @ basis
        else:
            out[:, start : start + block] = basis.T @ delta[:, start : start + block].to(device, torch.float64)
    return out


def _finish(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int, kept: float, total: float,
            s: torch.Tensor, method: str, bound: float, passes: int) -> LoraFactors:
    """Factors in float32 on CPU, with the error measured on the float32 product."""
    a32, b32 = a.to("cpu", torch.float32).contiguous(), b.to("cpu", torch.float32).contiguous()
    d32 = delta.to("cpu", torch.float32)
    norm = float(torch.linalg.vector_norm(d32))
    residual = float(torch.linalg.vector_norm(torch.addmm(d32, b32, a32, alpha=-1.0))) if k else norm
    return LoraFactors(
        A=a32, B=b32, rank=k, relative_error=residual / norm if norm > 0 else 0.0,
        energy=kept / total if total > 0 else 1.0, singular_values=s.to("cpu"), method=method, bound=bound,
        passes=passes,
    )


def _randomized(delta: torch.Tensor, rank: int | None, energy: float | None, max_rank: int | None,
                device: str | torch.device | None) -> LoraFactors | None:
    """The randomised route, or None where the exact one must decide."""
    want = rank if rank is None else min(rank, max_rank or rank)
    profile = rsvd.randomized_profile(delta.to(device), rank=want, energy=energy if rank is None else None)
    if profile is None:
        return None
    if profile.total == 0.0:
        k = 0
    elif rank is not None:
        k = min(want, profile.s.numel())  # type: ignore[type-var]
    else:
        lo, hi = profile.energy_ranks(float(energy))  # type: ignore[arg-type]
        if max_rank is not None and lo >= max_rank:
            k = max_rank
        elif lo != hi or hi > profile.s.numel():
            return None  # the bounds leave the smallest rank open: decide exactly
        else:
            k = hi if max_rank is None else min(hi, max_rank)
    root = profile.s[:k].sqrt()
    b = profile.u[:, :k] * root
    a = root[:, None] * profile.v[:, :k].T
    return _finish(delta, a, b, k, profile.kept(k), profile.total, profile.s, "randomized",
                   profile.bound(k) if k else 1.0, profile.passes)


@torch.no_grad()
def factorize(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    device: str | torch.device | None = None,
    exact: bool = False,
    randomized_from: int = RANDOMIZED_FROM,
) -> LoraFactors:
    """Truncated-SVD LoRA factors of ``delta`` (out × in, any float dtype), float32 on CPU.

    The randomised route for min(m, n) > ``randomized_from`` unless ``exact``.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    if not exact and min(delta.shape) > randomized_from:
        found = _randomized(delta, rank, energy, max_rank, device)
        if found is not None:
            return found
    m, n = delta.shape
    tall = m >= n
    chosen = lambda values: choose_rank(values.flip(0).clamp_min(0.0).sqrt().cpu(), rank=rank,  # noqa: E731
                                        energy=energy, max_rank=max_rank)
    eigenvalues, vectors = symmetric_top(gram(delta, device=device), chosen)  # every eigenvalue, k vectors
    sigma = eigenvalues.flip(0).clamp_min(0.0).sqrt()
    k = vectors.shape[1]
    root = sigma[:k].sqrt()
    inv_root = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))  # σ = 0: that direction adds nothing
    basis = vectors[:, :k]
    if tall:  # basis = V_k: B = τ·V_k/√σ, A = √σ·V_kᵀ
        b = _project(delta, basis, tall=True, device=device) * inv_root
        a = root[:, None] * basis.T
    else:  # basis = U_k: B = U_k·√σ, A = U_kᵀ·τ/√σ
        b = basis * root
        a = inv_root[:, None] * _project(delta, basis, tall=False, device=device)
    s64 = sigma.to("cpu")
    return _finish(delta, a, b, k, float((s64[:k] ** 2).sum()), float((s64 ** 2).sum()), s64, "exact", 1.0, 0)
