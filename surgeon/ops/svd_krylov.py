"""The Krylov route: top-k eigenpairs of a symmetric PSD operator G = WWᵀ given only as x ↦ G·x.

* :func:`krylov_eigs`: block Lanczos with full reorthogonalization, Ritz pairs on a schedule.
* :func:`chebyshev_eigs`: Chebyshev-filtered subspace iteration (Zhou & Saad 2007), for
  operators that are cheap to apply (the low-rank path: O(N·r) per vector), where no
  growing basis has to be orthogonalized against.

Both accept only pairs whose singular residual ‖G y − θ y‖/√θ is ≤ tol·√θ₁, and return
None when they do not get there within their budget (the caller falls back).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from surgeon.ops.blas import mm
from surgeon.ops.svd_types import SEED, TINY, flush


def orth(x: torch.Tensor, basis: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal columns spanning ``x`` minus its part in ``basis`` (orthonormal); random where ``x`` has none."""
    scale = float(x.norm(dim=0).max()) if x.numel() else 0.0
    for attempt in range(2):
        for _ in range(2):  # "twice is enough" (Kahan/Parlett) for full reorthogonalization
            if basis is not None:
                x = x - mm(basis, mm(basis.T, x))
        q, r = torch.linalg.qr(x)
        lost = r.diagonal().abs() <= 1e-8 * max(scale, 1e-300)
        if attempt == 1 or not bool(lost.any()):
            return q
        # the Krylov space is (nearly) invariant: continue with fresh directions
        x = x.clone()
        x[:, lost] = torch.randn(x.shape[0], int(lost.sum()), generator=generator, dtype=x.dtype).to(x.device) * scale
    return q


class _Schedule:
    """When to compute Ritz pairs: geometrically at first, then where the observed (linear in the
    Krylov dimension) decay of log(residual/tolerance) predicts convergence."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.next = 2 * block
        self.seen: list[tuple[int, float]] = []

    def due(self, d: int) -> bool:
        return d >= self.next

    def observed(self, d: int, excess: float) -> None:
        """``excess`` = max residual / tolerance (> 1: not converged) at Krylov dimension ``d``."""
        self.seen.append((d, math.log(max(excess, 1.0 + 1e-12))))
        step = max(self.block, int(0.4 * d))
        if len(self.seen) >= 2:
            (d0, l0), (d1, l1) = self.seen[-2], self.seen[-1]
            slope = (l1 - l0) / max(d1 - d0, 1)
            if slope < 0:  # aim just past the predicted convergence, never more than 40% further
                step = min(step, max(self.block, int(1.05 * l1 / -slope)))
        self.next = d + step


def krylov_eigs(
    apply: Callable[[torch.Tensor], torch.Tensor], dim: int, k: int, *, tol: float, block: int, max_dim: int,
    start: torch.Tensor | None = None, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Top-k eigenpairs (θ descending, Y (dim × k)) of a symmetric PSD operator G = WWᵀ, or None.

    Block Lanczos with full reorthogonalization; the projected matrix QᵀGQ grows a block at
    a time. Accepted when every pair's singular residual ‖G y − θ y‖/√θ is ≤ tol·√θ₁ (the
    residual ‖W v − σ u‖ of the triplet it gives); None when the Krylov basis would pass
    ``max_dim`` first. ``start`` (dim × s): directions to begin with (filled up to
    ``block`` with G·random).
    """
    gen = generator or torch.Generator().manual_seed(SEED)
    block = min(block, dim)
    fill = block - (0 if start is None else start.shape[1])
    first = apply(torch.randn(dim, max(fill, 0), generator=gen, dtype=dtype).to(device))
    if start is not None:
        first = torch.cat([start.to(device, dtype), first], 1)[:, :block]
    max_dim = min(max_dim, dim)
    basis = torch.empty(dim, max_dim, dtype=dtype, device=device)
    image = torch.empty_like(basis)
    h = torch.empty(max_dim, max_dim, dtype=dtype, device=device)
    q, d, schedule = flush(orth(first, None, gen)), 0, _Schedule(block)
    while True:
        width = q.shape[1]
        basis[:, d:d + width] = q
        image[:, d:d + width] = flush(apply(q))
        d += width
        column = mm(basis[:, :d].T, image[:, d - width:d])
        h[:d, d - width:d] = column
        h[d - width:d, :d] = column.T
        if schedule.due(d) or d >= max_dim:
            found, excess = _ritz(basis[:, :d], image[:, :d], h[:d, :d], k, tol)
            if found is not None:
                return found[0], found[1], d
            if d >= max_dim:
                return None
            schedule.observed(d, excess)
        q = flush(orth(image[:, d - width:d][:, :min(block, max_dim - d)], basis[:, :d], gen))



def _ritz(basis: torch.Tensor, image: torch.Tensor, h: torch.Tensor, k: int, tol: float
          ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, float]:
    """((θ, Y) if the top-k Ritz pairs pass the residual test, else None; max residual / tolerance)."""
    theta, z = torch.linalg.eigh(flush((h + h.T) / 2))
    theta, z = theta.flip(0)[:k].clamp_min(0), z.flip(1)[:, :k]
    if theta.numel() < k or float(theta[-1]) <= TINY**2 * float(theta[0]):
        return None, math.inf  # (nearly) rank-deficient top-k: leave it to the dense route
    y = mm(basis, z)
    rho = (mm(image, z) - y * theta).norm(dim=0)
    sigma = theta.sqrt()
    excess = float((rho / sigma).max()) / (tol * float(sigma[0]))
    return ((theta, y) if excess <= 1.0 else None), excess


def chebyshev_eigs(
    apply: Callable[[torch.Tensor], torch.Tensor], dim: int, k: int, *, tol: float, block: int, max_steps: int,
    start: torch.Tensor | None = None, degree: int = 24, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Top-k eigenpairs of a symmetric PSD operator by Chebyshev-filtered subspace iteration.

    (Zhou & Saad 2007.) Each round applies the degree-``degree`` Chebyshev polynomial that is
    at most 1 on [0, c] (c: the block's smallest Ritz value) and grows fast above it, then
    orthonormalizes and takes Ritz pairs. No basis grows, so when G is cheap to apply (the
    low-rank path: O(N·r) per vector) a round costs O(degree·N·r·b). Same acceptance test
    as :func:`krylov_eigs`; None after ``max_steps`` applications of G to the block.
    """
    gen = generator or torch.Generator().manual_seed(SEED)
    x = torch.randn(dim, block, generator=gen, dtype=dtype).to(device)
    if start is not None:
        x[:, :start.shape[1]] = start.to(device, dtype)
    x = flush(orth(x, None, gen))
    theta, x, gx = _rotate(x, flush(apply(x)))
    steps = 1
    while steps + degree <= max_steps:
        top, cut = float(theta[0]), float(theta[-1])
        if top <= 0 or cut <= TINY**2 * top or cut >= top:
            return None  # zero eigenvalues inside the block, or a flat block: nothing to filter against
        m = _filter_degree(theta, k, cut, degree)
        filtered = _chebyshev_filter(apply, x, gx, m, cut, top)
        if not bool(torch.isfinite(filtered).all()):
            return None
        x = flush(orth(filtered, None, gen))
        theta, x, gx = _rotate(x, flush(apply(x)))
        steps += m
        sigma = theta[:k].clamp_min(0).sqrt()
        rho = (gx[:, :k] - x[:, :k] * theta[:k]).norm(dim=0)
        if float((rho / sigma).max()) <= tol * float(sigma[0]):
            return theta[:k].clamp_min(0), x[:, :k], steps
    return None


def _filter_degree(theta: torch.Tensor, k: int, cut: float, degree: int) -> int:
    """At most ``degree``, and low enough that p(θ₁)/p(θ_k) stays below ~1e7: a large outlier (an
    intruder) would otherwise drown the other wanted directions below the rounding of the block."""
    half = cut / 2
    spread = math.acosh(max(float(theta[0]) - half, half) / half) - math.acosh(
        max(float(theta[min(k, theta.numel()) - 1]) - half, half) / half)
    return degree if spread <= 0 else max(2, min(degree, int(16.0 / spread)))


def _chebyshev_filter(apply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, gx: torch.Tensor,
                      degree: int, cut: float, top: float) -> torch.Tensor:
    """p(G)·x for the degree-``degree`` Chebyshev polynomial of [0, cut], scaled so that p(top) ≈ 1
    (Zhou & Saad's three-term recurrence with scaling: no overflow at any degree)."""
    e = c = cut / 2
    sigma = sigma1 = e / (top - c)
    prev, cur = x, (gx - c * x) * (sigma1 / e)
    for _ in range(degree - 1):
        sigma2 = 1.0 / (2.0 / sigma1 - sigma)
        prev, cur = cur, (apply(cur) - c * cur) * (2.0 * sigma2 / e) - (sigma * sigma2) * prev
        sigma = sigma2
    return flush(cur)  # once a round: damped components shrink by ≤ ~1e-7 a round


def _rotate(x: torch.Tensor, gx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz in span(x): (θ descending, Ritz vectors, G·Ritz vectors)."""
    h = x.T @ gx
    theta, z = torch.linalg.eigh(flush((h + h.T) / 2))
    theta, z = theta.flip(0), z.flip(1)
    return theta, x @ z, gx @ z
