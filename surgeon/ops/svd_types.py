"""Shared pieces of the spectral decompositions: the triplet and basis types, tolerances, the residual check.

Matrices are in ``nn.Linear`` orientation (out × in); transpose a GPT-2 Conv1D weight first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DEFAULT_TOL = 1e-10
METHODS = ("auto", "krylov", "dense")
SEED = 0
TINY = 1e-7  # σ_k/σ₁ below this: the Gram route loses the vector, use a full SVD


@dataclass(frozen=True)
class BaseBasis:
    """The complete singular basis of the smaller side of W₀.

    ``side`` "left": ``basis`` is U₀ (m × m, m ≤ n); "right": V₀ (n × n, m > n). Column i
    belongs to ``s[i]``; ``s`` (N,) is descending. Both float64.
    """

    side: str
    basis: torch.Tensor
    s: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.s.numel())


@dataclass(frozen=True)
class Triplets:
    """The top-k singular triplets: ``u`` (m × k), ``s`` (k,) descending, ``v`` (n × k), float64.

    ``method``: "krylov" (block Lanczos), "chebyshev-lowrank" / "krylov-lowrank" (in the base's
    basis) or "dense", "davidson-tau" (a merged checkpoint, from the base and τ's range); ``steps``: the Krylov basis size (Lanczos) or the applications of the
    operator to the block (Chebyshev), 0 when dense; ``residual``: max_j ‖W v_j − σ_j u_j‖ / σ₁
    as checked.
    """

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    method: str
    steps: int
    residual: float



def residuals(w_apply: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, s: torch.Tensor,
              v: torch.Tensor) -> torch.Tensor:
    """‖W v_j − σ_j u_j‖ for each column; ``w_apply(x)`` computes W·x."""
    return (w_apply(v) - u * s).norm(dim=0)


def finish(w_apply: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
            method: str, dim: int) -> Triplets:
    scale = float(s[0]) if s.numel() and float(s[0]) > 0 else 1.0
    res = residuals(w_apply, u, s, v)
    return Triplets(u, s, v, method, dim, float(res.max()) / scale if res.numel() else 0.0)



def transposed(t: Triplets) -> Triplets:
    """The triplets of Wᵀ from those of W."""
    return Triplets(t.v, t.s, t.u, t.method, t.steps, t.residual)


def flush(x: torch.Tensor) -> torch.Tensor:
    """Zero entries below 1e-150 (1e-30 in float32) of ``x``, in place.

    In the base's eigenbasis the Krylov vectors' components along tiny eigenvalues decay
    like (λ_i/λ₁)^j and reach the subnormal range after a few dozen steps; subnormal
    arithmetic is two orders of magnitude slower on x86 (LAPACK's eigh slowed 20x).
    Values that small are zero to any precision the answer has.
    """
    return x.masked_fill_(x.abs() < (1e-150 if x.dtype == torch.float64 else 1e-30), 0.0)

