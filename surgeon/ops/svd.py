"""Singular value decompositions for spectral surgery: exactly what the definitions need, in float64.

Three routes to the k largest singular triplets of a tuned matrix W_t, each checked (every
triplet's residual ‖W v − σ u‖ must be ≤ tol·σ₁, tol 1e-10 by default, a thousand times
tighter than the rounding of a float32 SVD), each falling back to the dense decomposition:

* :func:`top_k`: a dense W_t, cold: block Krylov (block Lanczos on WWᵀ or WᵀW, full
  reorthogonalization, :mod:`surgeon.ops.svd_krylov`); the dense route when the iteration
  has not converged within a third of the space.
* :func:`top_k_low_rank`: W_t = W₀ + L·R (BASE + a LoRA), iterating in the base's basis,
  where W_tW_tᵀ = Σ₀² + (rank ≤ 2r), so applying it costs O(N·r) instead of O(m·n): Chebyshev
  filtered subspace iteration, then block Lanczos.
* :func:`top_k_merged`: a dense W_t whose base decomposition is known (a merged checkpoint):
  τ = W_t − W₀'s dominant range from a randomised range finder makes the low-rank operator of
  the previous route a near-exact preconditioner; block Davidson
  (:mod:`surgeon.ops.svd_davidson`) from its top eigenvectors, then :func:`top_k` started
  at the base's top singular vectors.

The complete base bases and the dense route come from the float64 Gram matrix
(:mod:`surgeon.ops.svd_gram`). :func:`estimate_cost` gives each route's work up front.
Matrices are in ``nn.Linear`` orientation (out × in); transpose a GPT-2 Conv1D weight first.
"""

from __future__ import annotations

import torch

from surgeon.ops.blas import mm
from surgeon.ops.svd_davidson import LowRankOperator, davidson_eigs
from surgeon.ops.svd_gram import GRAM_FROM, base_basis, dense_top_k, gram, singular_values
from surgeon.ops.svd_krylov import chebyshev_eigs, krylov_eigs
from surgeon.ops.svd_types import DEFAULT_TOL, METHODS, BaseBasis, Triplets, finish, residuals, transposed

__all__ = [
    "DEFAULT_TOL", "METHODS", "BaseBasis", "Triplets", "base_basis", "block_size", "chebyshev_eigs", "dense_top_k",
    "estimate_cost", "gram", "krylov_eigs", "residuals", "singular_values", "top_k", "top_k_low_rank",
    "top_k_merged",
]

_DENSE_UP_TO = 256
_CHEBYSHEV_STEPS = 1000  # applications of G to the block before the low-rank path turns to block Lanczos
_START_STEPS = 150  # the merged route's start (top eigenvectors of the cheap operator, to 1e-6): Chebyshev budget


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
    if dim >= GRAM_FROM:  # a compute-bound Gram once (cheaper than ~40 skinny passes over W), then a small GEMM per block
        g = gram(w)
        apply = lambda x: mm(g, x)  # noqa: E731
    else:
        apply = (lambda x: mm(w, mm(w.T, x))) if left else (lambda x: mm(w.T, mm(w, x)))
    found = krylov_eigs(apply, dim, k, tol=tol, block=block, max_dim=_krylov_budget(dim, block, method),
                        start=start, device=w.device)
    if found is None:
        return dense_top_k(w, k)
    theta, y, d = found
    s = theta.sqrt()
    if left:
        u, v = y, torch.nn.functional.normalize(mm(w.T, y), dim=0)
    else:
        u, v = torch.nn.functional.normalize(mm(w, y), dim=0), y
    result = finish(lambda x: mm(w, x), u, s, v, "krylov", d)
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
        return transposed(top_k_low_rank(w0.T, BaseBasis("left", base.basis, base.s), right.T, left.T, k, tol=tol,
                                         method=method))
    m, n = w0.shape
    k = min(k, m, n)
    w_apply = lambda x: mm(w0, x) + left @ (right @ x)  # noqa: E731
    block = block_size(k)
    if k == 0 or _use_dense(m, block, method):
        return dense_top_k(w0 + left @ right, k)
    q = base.basis
    apply = LowRankOperator.build(w0, q, base.s, left, right)
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
        u = mm(q, y)
        v = torch.nn.functional.normalize(mm(w0.T, u) + right.T @ (left.T @ u), dim=0)
        result = finish(w_apply, u, theta.sqrt(), v, label, steps)
        if result.residual <= tol:
            return result
    return top_k(w0 + left @ right, k, tol=tol, method="dense" if method == "krylov" else method)


def tau_range(tau: torch.Tensor, *, step: int = 16, limit: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(L (m × l) orthonormal, R = Lᵀτ (l × n)), float64: τ's dominant range by a blocked randomised range finder.

    Blocks of Gaussian probes (one power step each; the first block two ``step`` wide, the next ones
    ``step``) are added while the newest block's weakest ``step`` directions still hold more than 8x their
    share of the energy left outside the range (i.e. while the spectrum has not reached a flat tail: the
    rounding noise of a merged LoRA, the bulk of a full fine-tune), at most ``limit``. A merged LoRA of rank
    ≤ ``step`` is done after the first block: four passes over τ. The range is then rotated to τ's
    principal directions within it and the directions at the tail's level (≤ 8x the share) dropped: they
    model noise, and every direction kept costs the preconditioner (a rank-16 LoRA keeps 16 of 32, which
    makes its solves four times cheaper). In float32: L and R only shape a preconditioner, the answer is
    checked in float64.
    """
    a = tau.to(torch.float32)
    m, n = a.shape
    gen = torch.Generator().manual_seed(0)
    total = _energy(a)
    blocks: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    captured, share = 0.0, 0.0
    top = min(limit, m, n)
    while sum(b.shape[1] for b in blocks) < top:
        q = torch.cat(blocks, 1) if blocks else a.new_zeros(m, 0)
        width = min(step if blocks else 2 * step, top - q.shape[1])
        y = mm(a, torch.randn(n, width, generator=gen).to(a.device))
        y = mm(a, mm(a.T, torch.linalg.qr(y - q @ (q.T @ y))[0]))  # one power step: the flat tail drops out
        for _ in range(2):
            y = y - q @ (q.T @ y)
        new = torch.linalg.qr(y)[0]
        row = mm(new.T, a)
        energies = torch.linalg.eigvalsh((row.double() @ row.double().T))  # the block's directions, ascending
        tail = min(step, width)
        held, weakest = float(energies.sum()), float(energies[:tail].sum())
        blocks.append(new)
        rows.append(row)
        rest = max(total - captured - held, 0.0)
        captured += held
        share = rest / max(min(m, n) - q.shape[1] - width, 1)
        if weakest <= 8.0 * share * tail or rest <= 1e-12 * total:
            break
    left, right = torch.cat(blocks, 1).to(torch.float64), torch.cat(rows, 0).to(torch.float64)
    energies, z = torch.linalg.eigh(right @ right.T)  # τ's principal directions within the range, ascending
    keep = energies > 8.0 * share
    if not bool(keep.any()):
        keep[-1:] = True
    z = z[:, keep]
    return mm(left, z), mm(z.T, right)


def _energy(a: torch.Tensor) -> float:
    """‖a‖_F² in float64, summed by rows of its memory layout (one float32 sum loses the tail; a norm along
    a strided dimension, as for the transposed view of a tall τ, is ~15x slower than along a contiguous one)."""
    flat = a.T if not a.is_contiguous() and a.T.is_contiguous() else a
    return float(torch.linalg.vector_norm(flat, dim=-1).double().square().sum())


@torch.no_grad()
def top_k_merged(w0: torch.Tensor, base: BaseBasis, wt: torch.Tensor, k: int, *, tol: float = DEFAULT_TOL,
                 method: str = "auto", tau: torch.Tensor | None = None) -> Triplets:
    """Top-k triplets of a dense ``wt`` (m × n) given the complete basis of ``w0``: the warm route (module doc).

    ``tau``: W_t − W₀ if already at hand (any float dtype; it only shapes the preconditioner)."""
    if base.side == "right":
        return transposed(top_k_merged(w0.T, BaseBasis("left", base.basis, base.s), wt.T, k, tol=tol, method=method,
                                       tau=None if tau is None else tau.T))
    w0, wt = w0.to(torch.float64), wt.to(torch.float64)
    m, n = wt.shape
    k = min(k, m, n)
    block = block_size(k)
    start = base.basis[:, :block]
    if k == 0 or method != "auto" or _use_dense(m, block, method):
        return top_k(wt, k, tol=tol, method=method, start=start)
    left, right = tau_range(wt - w0 if tau is None else tau)
    q = base.basis
    pre = LowRankOperator.build(w0, q, base.s, left, right)
    wide = min(k + max(4, k // 2), m)
    first = chebyshev_eigs(pre, m, wide, tol=1e-6, block=min(-(-(wide + 4) // 4) * 4, m), max_steps=_START_STEPS,
                           start=torch.eye(m, wide, dtype=wt.dtype, device=wt.device), device=wt.device)
    y0 = first[1] if first is not None else _start(pre, m, wide)
    found = davidson_eigs(lambda x: mm(q.T, mm(wt, mm(wt.T, mm(q, x)))), pre, y0, k, tol=tol)
    if found is not None:
        theta, y, steps = found
        u = mm(q, y)
        v = torch.nn.functional.normalize(mm(wt.T, u), dim=0)
        result = finish(lambda x: mm(wt, x), u, theta.sqrt(), v, "davidson-tau", steps)
        if result.residual <= tol:
            return result
    return top_k(wt, k, tol=tol, method=method, start=start)


def _start(pre: LowRankOperator, m: int, wide: int) -> torch.Tensor:
    """The top ``wide`` Ritz vectors of the cheap operator in span(base's top directions, τ's range C, W₀Rᵀ's P):
    where the tuned top-k lies, up to the part of τ outside its range."""
    space = torch.linalg.qr(torch.cat([torch.eye(m, wide, dtype=pre.lam.dtype, device=pre.lam.device),
                                       pre.down.T], 1))[0]
    h = space.T @ pre(space)
    _, z = torch.linalg.eigh((h + h.T) / 2)
    return space @ z.flip(1)[:, :wide]


def estimate_cost(shape: tuple[int, int] | list[int], k: int, *, route: str, cached: bool = False,
                  rank: int = 16) -> float:
    """Floating-point operations (an estimate, for scheduling) of one matrix's decomposition by ``route``.

    ``route``: "lowrank" (BASE + adapter of rank ``rank``), "merged" (a dense TUNED with the base known),
    "krylov" (a dense TUNED, cold Krylov) or "dense"; ``cached``: the base's basis is on disk (else its
    Gram eigendecomposition is counted: N²·max(m, n) + 9N³). Coefficients are the leading terms of each
    algorithm, with the iteration counts these routes typically take on Gaussian-like spectra.
    """
    m, n = int(shape[0]), int(shape[1])
    small, big = min(m, n), max(m, n)
    base = 0.0 if cached else float(small) ** 2 * big + 9.0 * float(small) ** 3
    b = block_size(k)
    if route == "dense" or small <= max(4 * b, _DENSE_UP_TO):
        return base + float(small) ** 2 * big + 9.0 * float(small) ** 3
    if route == "lowrank":
        return base + 2.0 * small * big * rank + 400.0 * 2 * small * 2 * rank * 2 * b
    if route == "merged":
        probes = 2 * rank + 16
        return base + 4.0 * small * big * probes + (4.0 * small * big + 4.0 * small * small) * 6 * k
    return base + 2.0 * small * small * big + 400.0 * 2.0 * small * small  # Gram once, ~400 Krylov dims
