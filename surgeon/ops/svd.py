"""Singular value decompositions for spectral surgery: exactly what the definitions need, in float64.

* :func:`base_basis`: the complete singular basis of the *smaller* side of a base matrix
  W₀ (m × n), with every singular value: U₀ (m × m) when m ≤ n, else V₀ (n × n). It comes
  from the eigendecomposition of the float64 Gram matrix W₀W₀ᵀ (or W₀ᵀW₀), which costs a
  fraction of a full SVD and is more accurate than a float32 SVD (eigenvector error
  ~1e-16·σ₁²/(σ_i² − σ_{i±1}²) against ~6e-8·σ₁/|σ_i − σ_{i±1}|).
* :func:`top_k`: the k largest singular triplets of a dense matrix by block Krylov (block
  Lanczos on WWᵀ or WᵀW, full reorthogonalization). The answer is checked: every triplet's
  residual ‖W v − σ u‖ must be ≤ tol·σ₁ (tol 1e-10 by default, i.e. a thousand times tighter
  than the rounding of a float32 SVD); when the iteration has not converged within a third
  of the space it falls back to the dense decomposition.
* :func:`top_k_low_rank`: the same for W_t = W₀ + L·R (a merged LoRA), iterating in the base's
  basis, where W_tW_tᵀ = Σ₀² + (rank ≤ 2r), so applying it costs O(N·r) instead of O(m·n);
  there Chebyshev-filtered subspace iteration (no growing basis to orthogonalize against)
  beats Lanczos, which stays as the fallback before the dense route.

Matrices are in ``nn.Linear`` orientation (out × in); transpose a GPT-2 Conv1D weight first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

DEFAULT_TOL = 1e-10
METHODS = ("auto", "krylov", "dense")
_SEED = 0
_TINY = 1e-7  # σ_k/σ₁ below this: the Gram route loses the vector, use a full SVD
_DENSE_UP_TO = 256
_CHEBYSHEV_STEPS = 1000  # applications of G to the block before the low-rank path turns to block Lanczos
_GRAM_FROM = 512  # W from this size on (smaller side): iterate with its Gram matrix, formed once, by blocks


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
    basis) or "dense"; ``steps``: the Krylov basis size (Lanczos) or the applications of the
    operator to the block (Chebyshev), 0 when dense; ``residual``: max_j ‖W v_j − σ_j u_j‖ / σ₁
    as checked.
    """

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    method: str
    steps: int
    residual: float


def gram(w: torch.Tensor, *, parts: int = 4) -> torch.Tensor:
    """The Gram matrix of the smaller side of ``w`` (m × n): WWᵀ when m ≤ n, else WᵀW (N × N).

    Computed as XᵀX with X (max × N) contiguous, by blocks of its upper triangle only (a
    symmetric rank-k update: ``parts`` (parts+1)/2 GEMMs of N/parts columns instead of a full
    product, ~20% faster on a CPU for 2048 x 5632; the lower triangle is the mirror, exactly
    symmetric). Matrices under 512 on the small side take one plain product.
    """
    x = (w.T if w.shape[0] <= w.shape[1] else w).contiguous()  # XᵀX with long contiguous columns is the fast case
    n = x.shape[1]
    if n < _GRAM_FROM or parts <= 1 or x.device.type != "cpu":
        return x.T @ x
    step = -(-n // parts)
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    cols = [(i, x[:, i:i + step]) for i in range(0, n, step)]
    for a, (i, xa) in enumerate(cols):
        for j, xb in cols[a:]:
            block = xa.T @ xb
            out[i:i + block.shape[0], j:j + block.shape[1]] = block
            if j != i:
                out[j:j + block.shape[1], i:i + block.shape[0]] = block.T
    return out


def _gram_eigh(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s (N,), Q (N × N)) descending, from the Gram matrix of the smaller side of ``w`` (float64)."""
    gram_ = gram(w)
    evals, evecs = torch.linalg.eigh(gram_)
    return evals.flip(0).clamp_min(0).sqrt(), evecs.flip(1).contiguous()


@torch.no_grad()
def base_basis(w: torch.Tensor) -> BaseBasis:
    """The complete singular basis of the smaller side of ``w`` (m × n, any float dtype)."""
    w = w.to(torch.float64)
    s, q = _gram_eigh(w)
    return BaseBasis("left" if w.shape[0] <= w.shape[1] else "right", q, s)


@torch.no_grad()
def singular_values(w: torch.Tensor) -> torch.Tensor:
    """All min(m, n) singular values of ``w``, descending, float64 (from the Gram's eigenvalues)."""
    return torch.linalg.eigvalsh(gram(w.to(torch.float64))).flip(0).clamp_min(0).sqrt()


def residuals(w_apply: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, s: torch.Tensor,
              v: torch.Tensor) -> torch.Tensor:
    """‖W v_j − σ_j u_j‖ for each column; ``w_apply(x)`` computes W·x."""
    return (w_apply(v) - u * s).norm(dim=0)


def _finish(w_apply: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
            method: str, dim: int) -> Triplets:
    scale = float(s[0]) if s.numel() and float(s[0]) > 0 else 1.0
    res = residuals(w_apply, u, s, v)
    return Triplets(u, s, v, method, dim, float(res.max()) / scale if res.numel() else 0.0)


@torch.no_grad()
def dense_top_k(w: torch.Tensor, k: int) -> Triplets:
    """Top-k triplets from the dense decomposition (Gram eigh; a full SVD for near-rank-deficient ``w``)."""
    w = w.to(torch.float64)
    k = min(k, *w.shape)
    s_all, q = _gram_eigh(w)
    s = s_all[:k]
    if k == 0 or float(s[-1]) <= _TINY * float(s_all[0]):
        u_full, s_full, vh = torch.linalg.svd(w, full_matrices=False)
        return _finish(lambda x: w @ x, u_full[:, :k], s_full[:k], vh[:k].T, "dense", 0)
    if w.shape[0] <= w.shape[1]:
        u = q[:, :k]
        v = torch.nn.functional.normalize(w.T @ u, dim=0)
    else:
        v = q[:, :k]
        u = torch.nn.functional.normalize(w @ v, dim=0)
    return _finish(lambda x: w @ x, u, s, v, "dense", 0)


def _orth(x: torch.Tensor, basis: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal columns spanning ``x`` minus its part in ``basis`` (orthonormal); random where ``x`` has none."""
    scale = float(x.norm(dim=0).max()) if x.numel() else 0.0
    for attempt in range(2):
        for _ in range(2):  # "twice is enough" (Kahan/Parlett) for full reorthogonalization
            if basis is not None:
                x = x - basis @ (basis.T @ x)
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
    gen = generator or torch.Generator().manual_seed(_SEED)
    block = min(block, dim)
    fill = block - (0 if start is None else start.shape[1])
    first = apply(torch.randn(dim, max(fill, 0), generator=gen, dtype=dtype).to(device))
    if start is not None:
        first = torch.cat([start.to(device, dtype), first], 1)[:, :block]
    max_dim = min(max_dim, dim)
    basis = torch.empty(dim, max_dim, dtype=dtype, device=device)
    image = torch.empty_like(basis)
    h = torch.empty(max_dim, max_dim, dtype=dtype, device=device)
    q, d, schedule = _flush(_orth(first, None, gen)), 0, _Schedule(block)
    while True:
        width = q.shape[1]
        basis[:, d:d + width] = q
        image[:, d:d + width] = _flush(apply(q))
        d += width
        column = basis[:, :d].T @ image[:, d - width:d]
        h[:d, d - width:d] = column
        h[d - width:d, :d] = column.T
        if schedule.due(d) or d >= max_dim:
            found, excess = _ritz(basis[:, :d], image[:, :d], h[:d, :d], k, tol)
            if found is not None:
                return found[0], found[1], d
            if d >= max_dim:
                return None
            schedule.observed(d, excess)
        q = _flush(_orth(image[:, d - width:d][:, :min(block, max_dim - d)], basis[:, :d], gen))


def _flush(x: torch.Tensor) -> torch.Tensor:
    """Zero entries below 1e-150 (1e-30 in float32) of ``x``, in place.

    In the base's eigenbasis the Krylov vectors' components along tiny eigenvalues decay
    like (λ_i/λ₁)^j and reach the subnormal range after a few dozen steps; subnormal
    arithmetic is two orders of magnitude slower on x86 (LAPACK's eigh slowed 20x).
    Values that small are zero to any precision the answer has.
    """
    return x.masked_fill_(x.abs() < (1e-150 if x.dtype == torch.float64 else 1e-30), 0.0)


def _ritz(basis: torch.Tensor, image: torch.Tensor, h: torch.Tensor, k: int, tol: float
          ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, float]:
    """((θ, Y) if the top-k Ritz pairs pass the residual test, else None; max residual / tolerance)."""
    theta, z = torch.linalg.eigh(_flush((h + h.T) / 2))
    theta, z = theta.flip(0)[:k].clamp_min(0), z.flip(1)[:, :k]
    if theta.numel() < k or float(theta[-1]) <= _TINY**2 * float(theta[0]):
        return None, math.inf  # (nearly) rank-deficient top-k: leave it to the dense route
    y = basis @ z
    rho = (image @ z - y * theta).norm(dim=0)
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
    gen = generator or torch.Generator().manual_seed(_SEED)
    x = torch.randn(dim, block, generator=gen, dtype=dtype).to(device)
    if start is not None:
        x[:, :start.shape[1]] = start.to(device, dtype)
    x = _flush(_orth(x, None, gen))
    theta, x, gx = _rotate(x, _flush(apply(x)))
    steps = 1
    while steps + degree <= max_steps:
        top, cut = float(theta[0]), float(theta[-1])
        if top <= 0 or cut <= _TINY**2 * top or cut >= top:
            return None  # zero eigenvalues inside the block, or a flat block: nothing to filter against
        m = _filter_degree(theta, k, cut, degree)
        filtered = _chebyshev_filter(apply, x, gx, m, cut, top)
        if not bool(torch.isfinite(filtered).all()):
            return None
        x = _flush(_orth(filtered, None, gen))
        theta, x, gx = _rotate(x, _flush(apply(x)))
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
    return _flush(cur)  # once a round: damped components shrink by ≤ ~1e-7 a round


def _rotate(x: torch.Tensor, gx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz in span(x): (θ descending, Ritz vectors, G·Ritz vectors)."""
    h = x.T @ gx
    theta, z = torch.linalg.eigh(_flush((h + h.T) / 2))
    theta, z = theta.flip(0), z.flip(1)
    return theta, x @ z, gx @ z


def _krylov_budget(dim: int, block: int, method: str) -> int:
    return dim if method == "krylov" else max(4 * block, dim // 3)


def _use_dense(dim: int, block: int, method: str) -> bool:
    """Small matrices (N ≤ 256): the dense decomposition costs milliseconds, iterating cannot win."""
    return method == "dense" or (method == "auto" and dim <= max(4 * block, _DENSE_UP_TO))


def block_size(k: int) -> int:
    """Block width k (at least 8): b ≥ k keeps exactly repeated top singular values right (a block
    Krylov space holds min(b, multiplicity) vectors of each eigenspace), and narrower blocks reach
    the tolerance with a smaller Krylov basis (368 dims at b=8, 410 at b=10, 560 at b=16 for a
    2048 x 2048 Gaussian matrix plus a rank-16 LoRA)."""
    return max(8, k)


@torch.no_grad()
def top_k(w: torch.Tensor, k: int, *, tol: float = DEFAULT_TOL, method: str = "auto",
          start: torch.Tensor | None = None) -> Triplets:
    """The k largest singular triplets of ``w`` (m × n), float64, checked (see module doc).

    ``start`` (N × s, N = min(m, n)): vectors of the smaller side expected to lie near the
    answer (the base's top singular vectors), used to begin the iteration.
    """
    w = w.to(torch.float64)
    m, n = w.shape
    k = min(k, m, n)
    dim, block = min(m, n), block_size(k)
    if k == 0 or _use_dense(dim, block, method):
        return dense_top_k(w, k)
    left = m <= n
    if dim >= _GRAM_FROM:  # a compute-bound Gram once (cheaper than ~40 skinny passes over W), then a small GEMM per block
        apply = gram(w).__matmul__
    else:
        apply = (lambda x: w @ (w.T @ x)) if left else (lambda x: w.T @ (w @ x))
    found = krylov_eigs(apply, dim, k, tol=tol, block=block, max_dim=_krylov_budget(dim, block, method),
                        start=start, device=w.device)
    if found is None:
        return dense_top_k(w, k)
    theta, y, d = found
    s = theta.sqrt()
    if left:
        u, v = y, torch.nn.functional.normalize(w.T @ y, dim=0)
    else:
        u, v = torch.nn.functional.normalize(w @ y, dim=0), y
    result = _finish(lambda x: w @ x, u, s, v, "krylov", d)
    return result if result.residual <= tol else dense_top_k(w, k)


@torch.no_grad()
def top_k_low_rank(w0: torch.Tensor, base: BaseBasis, left: torch.Tensor, right: torch.Tensor, k: int, *,
                   tol: float = DEFAULT_TOL, method: str = "auto") -> Triplets:
    """Top-k triplets of W_t = W₀ + left·right, iterating in the basis of W₀.

    ``w0`` (m × n), ``left`` (m × r), ``right`` (r × n), float64; ``base`` = base_basis(w0).
    On the left side (m ≤ n, Q = U₀): QᵀW_tW_tᵀQ = Σ₀² + PᵀC + CᵀP + Cᵀ(RRᵀ)C with
    C = LᵀQ and P = R·W₀ᵀ·Q (r × m). m > n is the same problem transposed.
    """
    if base.side == "right":
        flipped = top_k_low_rank(w0.T, BaseBasis("left", base.basis, base.s), right.T, left.T, k, tol=tol,
                                 method=method)
        return Triplets(flipped.v, flipped.s, flipped.u, flipped.method, flipped.steps, flipped.residual)
    m, n = w0.shape
    k = min(k, m, n)
    w_apply = lambda x: w0 @ x + left @ (right @ x)  # noqa: E731
    block = block_size(k)
    if k == 0 or _use_dense(m, block, method):
        return dense_top_k(w0 + left @ right, k)
    q = base.basis
    c, p, rr = left.T @ q, (right @ w0.T) @ q, right @ right.T
    lam = (base.s * base.s)[:, None]
    r = c.shape[0]
    down, up = torch.cat([c, p]), torch.cat([p, c]).T.contiguous()  # (2r × m), (m × 2r)

    def apply(x: torch.Tensor) -> torch.Tensor:  # Λx + Pᵀ(Cx) + Cᵀ(Px + RRᵀ·Cx), two skinny GEMMs
        cx_px = down @ x
        cx_px[r:] += rr @ cx_px[:r]
        return torch.addmm(lam * x, up, cx_px)
    start = torch.eye(m, k, dtype=torch.float64, device=w0.device)  # the base's top directions
    wide = min(2 * block, m)
    attempts = [("chebyshev-lowrank", lambda: chebyshev_eigs(apply, m, k, tol=tol, block=wide, start=start,
                                                            max_steps=_CHEBYSHEV_STEPS, device=w0.device))]
    attempts.append(("krylov-lowrank", lambda: krylov_eigs(apply, m, k, tol=tol, block=block, start=start[:, :block],
                                                           max_dim=_krylov_budget(m, block, method), device=w0.device)))
    for label, attempt in attempts:
        found = attempt()
        if found is None:
            continue
        theta, y, steps = found
        u = q @ y
        v = torch.nn.functional.normalize(w0.T @ u + right.T @ (left.T @ u), dim=0)
        result = _finish(w_apply, u, theta.sqrt(), v, label, steps)
        if result.residual <= tol:
            return result
    return top_k(w0 + left @ right, k, tol=tol, method="dense" if method == "krylov" else method)
