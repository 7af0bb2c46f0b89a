"""The warm route for a merged checkpoint: block Davidson preconditioned by the base plus τ's dominant range.

In the base's basis Q (U₀, or V₀ for a tall matrix) the tuned Gram operator is
G_t = QᵀW_tW_tᵀQ. With τ = W_t − W₀ ≈ L·R (L's columns: τ's dominant range from a randomised
range finder; R = Lᵀτ), the operator G = Σ₀² + D with D = up·K·down of rank ≤ 2r
(:class:`LowRankOperator`) differs from G_t by the small remainder τ − LR (rounding noise of a
merged LoRA, the tail of a full fine-tune). G − θI is a diagonal plus rank 2r, so
(G − θI)⁻¹ costs O(N·r) per vector by the Woodbury identity: a preconditioner that is
nearly exact. Davidson with the Olsen correction t = M⁻¹r − ε·M⁻¹y (ε making t ⊥ y) then
converges like an inverse iteration: a few applications of the dense G_t per wanted
vector instead of a Krylov space of hundreds.

The start is the top eigenvectors of G (Chebyshev on the cheap operator), i.e. the base's
top singular vectors moved by τ's range. The acceptance test is the Krylov routes' one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from surgeon.ops.blas import mm
from surgeon.ops.svd_krylov import orth
from surgeon.ops.svd_types import SEED, flush

_RESTART = 6  # basis width in blocks of the wanted vectors before a thick restart


@dataclass(frozen=True)
class LowRankOperator:
    """G = diag(lam) + up·K·down in the base's basis, K = [[I, 0], [RRᵀ, I]] (2r × 2r).

    ``lam``: Σ₀² (N,); ``down`` (2r × N) = [C; P]; ``up`` (N × 2r) = [Pᵀ, Cᵀ]; ``rr`` = RRᵀ (r × r).
    """

    lam: torch.Tensor
    down: torch.Tensor
    up: torch.Tensor
    rr: torch.Tensor

    @classmethod
    def build(cls, w0: torch.Tensor, q: torch.Tensor, s: torch.Tensor, left: torch.Tensor, right: torch.Tensor
              ) -> LowRankOperator:
        """For W = W₀ + left·right (m ≤ n, Q = U₀): C = leftᵀQ, P = right·W₀ᵀ·Q."""
        r = left.shape[1]
        cp = mm(torch.cat([left.T, mm(right, w0.T)]), q)  # [C; P] in one pass over Q (memory-bound when Q is big)
        c, p = cp[:r], cp[r:]
        return cls(s * s, cp, torch.cat([p, c]).T.contiguous(), right @ right.T)

    @property
    def rank(self) -> int:
        return int(self.rr.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """G·x with two skinny GEMMs."""
        cx_px = mm(self.down, x)
        cx_px[self.rank:] += self.rr @ cx_px[:self.rank]
        return mm(self.up, cx_px).addcmul_(self.lam[:, None], x)

    def solve(self, theta: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """(G − θ_j I)⁻¹·rhs_j for each shift θ_j (b,) and right-hand sides rhs (b × N × c), by Woodbury:
        D⁻¹ − D⁻¹U(K⁻¹ + V D⁻¹ U)⁻¹V D⁻¹ with D = diag(lam) − θ_j; all shifts in one batched product."""
        d = self.lam[None, :] - theta[:, None]
        floor = 1e-13 * float(self.lam.abs().max()) if self.lam.numel() else 1e-300
        d = torch.where(d.abs() < floor, torch.full_like(d, floor).copysign(d), d)
        inv = 1.0 / d  # (b × N)
        r = self.rank
        k_inv = torch.eye(2 * r, dtype=d.dtype, device=d.device)
        k_inv[r:, :r] = -self.rr
        b, n, c = rhs.shape
        small = k_inv + mm((self.down[None] * inv[:, None, :]).reshape(b * 2 * r, n), self.up).reshape(b, 2 * r, 2 * r)
        y = inv[:, :, None] * rhs
        # the products with U and V for all shifts at once, as 2-D thin products (3-6x torch's batched ones)
        vy = mm(self.down, y.permute(1, 0, 2).reshape(n, b * c)).reshape(2 * r, b, c).permute(1, 0, 2)
        z = torch.linalg.solve(small, vy)  # (b × 2r × c)
        uz = mm(self.up, z.permute(1, 0, 2).reshape(2 * r, b * c)).reshape(n, b, c).permute(1, 0, 2)
        return y - inv[:, :, None] * uz


def davidson_eigs(
    apply: Callable[[torch.Tensor], torch.Tensor], precond: LowRankOperator, start: torch.Tensor, k: int, *,
    tol: float, max_iter: int = 12,
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Top-k eigenpairs (θ descending, Y (N × k)) of the PSD operator ``apply``, or None.

    ``start`` (N × b, b ≥ k): the first search space. Accepted when every pair's singular
    residual ‖G y − θ y‖/√θ is ≤ tol·√θ₁; None after ``max_iter`` rounds. The third value
    counts the applications of ``apply`` to a vector.
    """
    gen = torch.Generator().manual_seed(SEED)
    v = flush(orth(start, None, gen))
    gv = apply(v)
    steps = v.shape[1]
    width = v.shape[1]
    for _ in range(max_iter):
        h = v.T @ gv
        theta, z = torch.linalg.eigh(flush((h + h.T) / 2))
        theta, z = theta.flip(0)[:width].clamp_min(0), z.flip(1)[:, :width]
        y, gy = v @ z, gv @ z
        res = gy[:, :k] - y[:, :k] * theta[:k]
        sigma = theta[:k].sqrt()
        if float(sigma[-1]) <= 0:
            return None
        excess = (res.norm(dim=0) / sigma) / (tol * float(sigma[0]))
        if float(excess.max()) <= 1.0:
            return theta[:k], y[:, :k], steps
        open_ = torch.nonzero(excess > 1.0).flatten()
        t = _olsen(precond, theta[open_], y[:, open_], res[:, open_])
        if v.shape[1] + t.shape[1] > _RESTART * width:  # thick restart: keep the current Ritz vectors
            v, gv = y, gy
        t = flush(orth(t, v, gen))
        v, gv = torch.cat([v, t], 1), torch.cat([gv, apply(t)], 1)
        steps += t.shape[1]
    return None


def _olsen(precond: LowRankOperator, theta: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per column j: M_j⁻¹r_j − ε_j·M_j⁻¹y_j with M_j = G − θ_j·I and ε_j = y_jᵀM_j⁻¹r_j / y_jᵀM_j⁻¹y_j
    (so that the correction is ⊥ y_j to first order)."""
    both = precond.solve(theta, torch.stack([r.T, y.T], 2))  # (b × N × 2)
    mr, my = both[:, :, 0].T, both[:, :, 1].T
    denom = (y * my).sum(0)
    eps = torch.where(denom != 0, (y * mr).sum(0) / torch.where(denom != 0, denom, torch.ones_like(denom)),
                      torch.zeros_like(denom))
    return mr - eps * my
