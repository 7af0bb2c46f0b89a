"""Intruder dimensions (arXiv 2410.21228, as in the authors' code) and their rescaling.

For the top-k left singular vectors u_j of a tuned matrix W_t (nn.Linear orientation),
c_j = max_i |u_jᵀ u₀,i| over all min(m, n) left singular vectors of the base W₀; u_j is
an intruder when c_j < ε. Rescaling: W' = W_t + (λ − 1)·Σ_{j∈I} σ_j u_j v_jᵀ.

Pure functions on float64 tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from surgeon.ops.blas import mm
from surgeon.ops.svd import BaseBasis

EPSILON_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_NULL = 1e-12  # base directions with σ_i ≤ this·σ₁ are numerically undetermined


@torch.no_grad()
def base_cosines(base: BaseBasis, w0: torch.Tensor, vectors: torch.Tensor, side: str = "left") -> torch.Tensor:
    """|Xᵀ Q₀| as (N × k): cosines between ``vectors`` (dim × k, unit columns) and every base
    singular vector of ``side`` ("left": U₀, m-dim; "right": V₀, n-dim), rows by descending σ₀.

    ``base`` holds the complete basis of W₀'s smaller side; the other side's vectors are
    W₀ᵀu₀,i/σ₀,i (or W₀v₀,i/σ₀,i), so QᵀX = Σ₀⁻¹·Q_completeᵀ·W₀ᵀX without forming them.
    Directions with σ₀,i ≈ 0 are undetermined by W₀ and get cosine 0.
    """
    w0 = w0.to(torch.float64)
    vectors = vectors.to(torch.float64)
    if side == base.side:
        return mm(base.basis.T, vectors).abs()
    projected = mm(w0.T, vectors) if side == "left" else mm(w0, vectors)  # into the complete side's space
    s = base.s
    keep = s > _NULL * float(s[0]) if s.numel() and float(s[0]) > 0 else torch.zeros_like(s, dtype=torch.bool)
    inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    return (inv[:, None] * mm(base.basis.T, projected)).abs()


def max_cosines(cosines: torch.Tensor) -> tuple[list[float], list[int]]:
    """(c_j, argmax_i) per tuned vector j from an (N × k) cosine matrix."""
    best, where = cosines.max(dim=0)
    return [float(x) for x in best], [int(i) for i in where]


def intruder_ranks(c: Sequence[float], epsilon: float) -> list[int]:
    """1-based ranks j with c_j < ε."""
    return [j + 1 for j, value in enumerate(c) if value < epsilon]


def energy_share(s: Sequence[float], ranks: Sequence[int]) -> float:
    """Σσ²(intruders) / Σσ²(top-k)."""
    total = sum(x * x for x in s)
    return sum(s[j - 1] ** 2 for j in ranks) / total if total > 0 else 0.0


def sweep(c: Sequence[float], epsilons: Sequence[float] = EPSILON_SWEEP) -> dict[str, int]:
    """Intruder count at each ε (keys like "0.5")."""
    return {f"{eps:g}": sum(1 for value in c if value < eps) for eps in epsilons}


@lru_cache(maxsize=256)
def random_baseline(dim: int, count: int, *, samples: int = 1000, seed: int = 0) -> float:
    """E[max_i |xᵀq_i|] for x uniform on the unit sphere of R^dim and ``count`` orthonormal q_i.

    The value c_j takes when u_j has nothing to do with the base; ε near or below it makes
    every direction an intruder. Monte Carlo with a fixed seed (the first ``count``
    coordinates of a normalized Gaussian): standard error about 0.01 in 2-3 dimensions, under 0.003 from about 30.
    """
    count = min(count, dim)
    if dim <= 1:
        return 1.0
    rng = np.random.default_rng(seed)
    total, chunk = 0.0, max(1, min(samples, (1 << 22) // max(count, 1)))
    done = 0
    while done < samples:
        n = min(chunk, samples - done)
        head = rng.standard_normal((n, count), dtype=np.float32)
        rest = rng.chisquare(dim - count, n) if dim > count else np.zeros(n)
        norms = np.sqrt((head * head).sum(axis=1, dtype=np.float64) + rest)
        total += float((np.abs(head).max(axis=1) / norms).sum())
        done += n
    return total / samples


def asymptotic_baseline(dim: int, count: int) -> float:
    """√(2·ln(2·count)/dim): the large-dimension approximation of :func:`random_baseline`."""
    return math.sqrt(2.0 * math.log(2.0 * max(count, 1)) / max(dim, 1))


@torch.no_grad()
def intruder_edit(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, ranks: Sequence[int], lam: float) -> torch.Tensor:
    """(λ − 1)·Σ_{j∈ranks} σ_j u_j v_jᵀ (m × n, float64); ``ranks`` are 1-based into the triplets."""
    idx = torch.tensor([j - 1 for j in ranks], dtype=torch.long, device=u.device)
    u_i, s_i, v_i = u[:, idx].to(torch.float64), s[idx].to(torch.float64), v[:, idx].to(torch.float64)
    return (lam - 1.0) * (u_i * s_i) @ v_i.T


def intruder_factors(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, ranks: Sequence[int], lam: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The edit as LoRA factors: (A (|I| × n) = V_Iᵀ, B (m × |I|) = (λ − 1)·U_I·Σ_I), float64."""
    idx = torch.tensor([j - 1 for j in ranks], dtype=torch.long, device=u.device)
    return v[:, idx].T.to(torch.float64).contiguous(), ((lam - 1.0) * u[:, idx] * s[idx]).to(torch.float64)
