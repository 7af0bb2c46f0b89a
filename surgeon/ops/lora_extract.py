"""LoRA factors of a weight delta by truncated SVD.

For τ (out × in) = U·S·Vᵀ, the rank-k factors are B = U_k·√S_k (out × k) and
A = √S_k·V_kᵀ (k × in), so that B·A is the best rank-k approximation of τ
(Eckart–Young) and, with alpha = k, PEFT's scaling alpha/r is 1.

The decomposition comes from the float64 Gram matrix of the shorter side (an
eigendecomposition of n × n instead of an SVD of out × in): with V_k from
τᵀτ = V·S²·Vᵀ, U_k·S_k = τ·V_k, so B = τ·V_k/√S_k and A = √S_k·V_kᵀ (and the
mirror image when out < in). In float64 this is accurate far beyond float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.ops.task_vector import energy_rank, gram


@dataclass(frozen=True)
class LoraFactors:
    """A (k × in) and B (out × k), float32 on CPU; errors relative to ‖τ‖_F.

    ``relative_error`` = ‖τ − B·A‖_F / ‖τ‖_F (measured, not inferred from σ);
    ``energy`` = Σ_{i≤k} σ_i² / Σ σ_i²; ``singular_values``: all of them (float64).
    """

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    relative_error: float
    energy: float
    singular_values: torch.Tensor


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


@torch.no_grad()
def factorize(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    device: str | torch.device | None = None,
) -> LoraFactors:
    """Truncated-SVD LoRA factors of ``delta`` (out × in, any float dtype), float32 on CPU."""
    m, n = delta.shape
    tall = m >= n
    eigenvalues, vectors = torch.linalg.eigh(gram(delta, device=device))  # ascending
    sigma = eigenvalues.flip(0).clamp_min(0.0).sqrt()
    vectors = vectors.flip(1)
    k = choose_rank(sigma.cpu(), rank=rank, energy=energy, max_rank=max_rank)
    root = sigma[:k].sqrt()
    inv_root = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))  # σ = 0: that direction adds nothing
    basis = vectors[:, :k]
    if tall:  # basis = V_k: B = τ·V_k/√σ, A = √σ·V_kᵀ
        b = _project(delta, basis, tall=True, device=device) * inv_root
        a = root[:, None] * basis.T
    else:  # basis = U_k: B = U_k·√σ, A = U_kᵀ·τ/√σ
        b = basis * root
        a = inv_root[:, None] * _project(delta, basis, tall=False, device=device)
    a32, b32 = a.to("cpu", torch.float32).contiguous(), b.to("cpu", torch.float32).contiguous()
    s64 = sigma.to("cpu")
    total = float((s64**2).sum())
    d32 = delta.to("cpu", torch.float32)
    norm = float(torch.linalg.vector_norm(d32))
    residual = float(torch.linalg.vector_norm(d32 - b32 @ a32)) if k else norm
    return LoraFactors(
        A=a32, B=b32, rank=k, relative_error=residual / norm if norm > 0 else 0.0,
        energy=float((s64[:k] ** 2).sum()) / total if total > 0 else 1.0, singular_values=s64,
    )
