"""Randomised SVD of a task vector τ with a posteriori checks (Halko, Martinsson & Tropp 2011).

For Q (m × l) orthonormal and B = Qᵀτ, the energy outside the range is known exactly,
‖τ − QB‖²_F = ‖τ‖²_F − ‖B‖²_F, and the singular values of B are lower bounds of τ's:
s_i ≤ σ_i. Since τᵀτ = BᵀB + EᵀE (E = τ − QB, QᵀE = 0), Ky Fan's inequality gives an
upper bound too: Σ_{i≤k} σ_i² ≤ Σ_{i≤k} s_i² + min(‖E‖²_F, k·‖E‖²₂). So

* the rank-k truncation Q·B_k has error² = ‖τ‖² − Σ_{i≤k} s_i², at most the optimal
  error² plus that bound (``bound``: the guaranteed ratio err/opt, with ‖E‖₂ estimated by
  a short power iteration on E);
* for an energy fraction f the smallest k holding f is pinned between the k where the
  lower and the upper bound first reach f·‖τ‖².

The range grows (blocks of ``step``) until it holds the requested rank and energy, then
subspace (power) iterations run until the top-k energy Σ_{i≤k} s_i² is stationary
(relative change ≤ ``rtol`` of the truncation error²); the bound is reported, not
waited for (it is loose where the tail is flat: k·‖E‖²₂ against a tail of N − k values). Where the
range would exceed ``max_share`` of min(m, n) the dense float64 route is cheaper and
exact: callers get ``exact = True`` from :func:`dense_profile`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.ops.svd_types import SEED

_RTOL = 1e-4
_MAX_POWER = 6


@dataclass(frozen=True)
class Profile:
    """The top of τ's spectrum: ``s`` (l,) descending, ``u`` (m × l), ``v`` (n × l), float64.

    ``total`` = ‖τ‖²_F; ``outside`` = ‖τ − QQᵀτ‖²_F (0 when exact); ``tail_norm``: an estimate of
    ‖τ − QQᵀτ‖₂ (at most ‖τ − QQᵀτ‖_F, which bounds it); ``passes``: products with τ or τᵀ (one each per column block); ``exact``: all
    min(m, n) singular values (dense route).
    """

    s: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    total: float
    outside: float
    tail_norm: float
    passes: int
    exact: bool

    def kept(self, k: int) -> float:
        """Σ_{i≤k} s_i² (a lower bound of τ's top-k energy, exact when ``exact``)."""
        return float((self.s[:k] ** 2).sum())

    def upper(self, k: int) -> float:
        """An upper bound of τ's top-k energy (Ky Fan, see module doc)."""
        return min(self.total, self.kept(k) + min(self.outside, k * self.tail_norm ** 2))

    def bound(self, k: int) -> float:
        """Guaranteed ratio (rank-k error of this profile) / (optimal rank-k error); inf if not bounded."""
        err2 = max(self.total - self.kept(k), 0.0)
        opt2 = max(self.total - self.upper(k), 0.0)
        if err2 == 0.0:
            return 1.0
        return (err2 / opt2) ** 0.5 if opt2 > 0 else float("inf")

    def energy_ranks(self, fraction: float) -> tuple[int, int]:
        """(smallest k the upper bound allows, smallest k this profile achieves) for ``fraction`` of ‖τ‖²."""
        goal = min(fraction, 1.0) * self.total * (1 - 1e-12)
        width = self.s.numel()
        hi = next((k for k in range(1, width + 1) if self.kept(k) >= goal), None)
        lo = next((k for k in range(1, width + 1) if self.upper(k) >= goal), width)
        return lo, (hi if hi is not None else width + 1)


def _orth(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning tall-skinny ``x``: Cholesky QR twice (two GEMMs and a tiny Cholesky each,
    far cheaper than Householder QR for l ≪ m), Householder where the Gram matrix is not safely definite."""
    q = x
    for _ in range(2):
        g = q.T @ q
        chol, info = torch.linalg.cholesky_ex(g)
        if int(info) != 0 or float(chol.diagonal().min()) <= 1e-6 * float(chol.diagonal().max()):
            return torch.linalg.qr(x)[0]
        q = q @ torch.linalg.inv(chol).T.to(q.dtype)  # X·R⁻¹ with R = Lᵀ: one GEMM
    return q


def _small_svd(b: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the l × n matrix B = Qᵀτ (in float64, from the eigenvectors of BBᵀ; V = BᵀU_B/s), lifted:
    (U = Q·U_B, s, V), float64."""
    b = b.double()
    evals, ub = torch.linalg.eigh(b @ b.T)  # l × l: far cheaper than LAPACK's SVD of a wide l × n matrix
    s, ub = evals.flip(0).clamp_min(0).sqrt(), ub.flip(1)
    return q.double() @ ub, s, torch.nn.functional.normalize(b.T @ ub, dim=0)


def _tail_norm(tau: torch.Tensor, q: torch.Tensor, gen: torch.Generator, steps: int) -> tuple[float, int]:
    """‖(I − QQᵀ)τ‖₂ by a short power iteration on E = (I − QQᵀ)τ, times 1.05 (it converges from below)."""
    x = torch.randn(tau.shape[1], 2, generator=gen, dtype=tau.dtype).to(tau.device)
    est = 0.0
    for _ in range(steps):
        x = torch.nn.functional.normalize(x, dim=0)
        y = tau @ x
        y = y - q @ (q.T @ y)
        est = float(y.norm(dim=0).max())
        x = tau.T @ (y - q @ (q.T @ y))
    return 1.05 * est, 2 * steps


@torch.no_grad()
def dense_profile(tau: torch.Tensor) -> Profile:
    """Every singular triplet of ``tau`` from a float64 full SVD (the ``--exact`` route)."""
    a = tau.to(torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    total = float((s ** 2).sum())
    return Profile(s, u, vh.T, total, 0.0, 0.0, 0, True)


@torch.no_grad()
def randomized_profile(tau: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                       step: int = 16, max_share: float = 0.25, rtol: float = _RTOL, norm_steps: int = 2,
                       dtype: torch.dtype = torch.float32) -> Profile | None:
    """The top of ``tau``'s spectrum holding ``rank`` triplets and/or ``energy`` of ‖τ‖² (see module doc).

    None when the range this needs passes ``max_share``·min(m, n): use :func:`dense_profile`. The passes
    over τ run in ``dtype`` (float32: τ is float32, and each pass reads it once), ‖τ‖² and the small SVDs
    in float64. ``norm_steps``: power steps estimating ‖E‖₂ (0: its Frobenius bound, no extra pass).
    """
    a = tau.to(dtype)
    m, n = a.shape
    total = float(tau.to(torch.float64).square().sum())
    gen = torch.Generator().manual_seed(SEED)
    limit = max(int(max_share * min(m, n)), 1)
    want = 0 if rank is None else min(rank, m, n)
    if total == 0.0:
        z = torch.zeros(0, dtype=torch.float64)
        return Profile(z, torch.zeros(m, 0, dtype=torch.float64), torch.zeros(n, 0, dtype=torch.float64), 0.0, 0.0,
                       0.0, 0, False)
    width = min(max(want + max(8, want // 2), step), min(m, n))
    if width > limit:
        return None
    q = _orth(a @ torch.randn(n, width, generator=gen, dtype=dtype).to(a.device))
    passes = 1
    while True:
        b = q.T @ a
        passes += 1
        outside = max(total - float(b.double().square().sum()), 0.0)
        if energy is None or outside <= (1.0 - energy) * total * 0.5 or q.shape[1] >= min(m, n):
            break
        grow = min(max(step, q.shape[1]), min(m, n) - q.shape[1])  # double the range
        if q.shape[1] + grow > limit:
            return None
        extra = a @ torch.randn(n, grow, generator=gen, dtype=dtype).to(a.device)
        extra = extra - q @ (q.T @ extra)
        q = torch.cat([q, _orth(extra - q @ (q.T @ extra))], 1)
        passes += 1
    return _refine(a, q, b, total, want, energy, passes, gen, rtol, norm_steps)


def _refine(a: torch.Tensor, q: torch.Tensor, b: torch.Tensor, total: float, want: int, energy: float | None,
            passes: int, gen: torch.Generator, rtol: float, norm_steps: int) -> Profile:
    """Subspace iterations on range(Q) until the top-k energy is stationary."""
    previous = None
    for power in range(_MAX_POWER + 1):
        u, s, v = _small_svd(b, q)
        k = want
        if energy is not None:
            cum = torch.cumsum(s ** 2, 0)
            k = max(k, int((cum < energy * total * (1 - 1e-12)).sum()) + 1)
        kept = float((s[:min(max(k, 1), s.numel())] ** 2).sum())
        err2 = max(total - kept, 0.0)
        if previous is not None and abs(kept - previous) <= rtol * max(err2, 1e-24 * total) or power == _MAX_POWER:
            break
        previous = kept
        q = _orth(a @ _orth(a.T @ q))  # one power step: range(ττᵀQ)
        b = q.T @ a
        passes += 3
    outside = _outside(a, q, b, total)
    tail, extra = _tail_norm(a, q, gen, norm_steps) if outside > 0 and norm_steps else (outside ** 0.5, 0)
    return Profile(s, u, v, total, outside, min(tail, outside ** 0.5), passes + extra, False)


def _outside(a: torch.Tensor, q: torch.Tensor, b: torch.Tensor, total: float) -> float:
    """‖τ − QQᵀτ‖²_F: ‖τ‖² − ‖Qᵀτ‖² where that difference is well above the rounding of the float32 Qᵀτ
    (~1e-7·‖τ‖², which depends on the BLAS's summation order), else the residual itself in float64 (a
    nearly low-rank τ: the case where the tail decides whether the numerical rank is exact)."""
    outside = max(total - float(b.double().square().sum()), 0.0)
    if outside > 1e-4 * total:
        return outside
    return float((a.double() - q.double() @ b.double()).square().sum())
