"""LoRA factors of a weight delta by truncated SVD.

For τ (out × in) = U·S·Vᵀ, the rank-k factors are B = U_k·√S_k (out × k) and
A = √S_k·V_kᵀ (k × in), so that B·A is the best rank-k approximation of τ
(Eckart–Young) and, with alpha = k, PEFT's scaling alpha/r is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.ops.task_vector import energy_rank


@dataclass(frozen=True)
class LoraFactors:
    """A (k × in) and B (out × k), float32 on CPU; errors relative to ‖τ‖_F.

    ``relative_error`` = ‖τ − B·A‖_F / ‖τ‖_F (measured, not inferred from σ);
    ``energy`` = Σ_{i≤k} σ_i² / Σ σ_i²; ``singular_values``: all of them (float32).
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


@torch.no_grad()
def factorize(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    device: str | torch.device | None = None,
    svd_dtype: torch.dtype = torch.float32,
) -> LoraFactors:
    """Truncated-SVD LoRA factors of ``delta`` (out × in, any float dtype).

    The SVD runs in ``svd_dtype`` on ``device``; the factors come back as float32 on CPU.
    """
    work = delta.to(device=device, dtype=svd_dtype)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    k = choose_rank(s, rank=rank, energy=energy, max_rank=max_rank)
    root = s[:k].sqrt()
    b = u[:, :k] * root  # (out × k)
    a = root[:, None] * vh[:k]  # (k × in)
    total = float((s.to(torch.float64) ** 2).sum())
    kept = float((s[:k].to(torch.float64) ** 2).sum())
    a32 = a.to("cpu", torch.float32)
    b32 = b.to("cpu", torch.float32)
    d32 = delta.to("cpu", torch.float32)
    norm = float(torch.linalg.vector_norm(d32))
    residual = float(torch.linalg.vector_norm(d32 - b32 @ a32)) if k else norm
    return LoraFactors(
        A=a32.contiguous(),
        B=b32.contiguous(),
        rank=k,
        relative_error=residual / norm if norm > 0 else 0.0,
        energy=kept / total if total > 0 else 1.0,
        singular_values=s.to("cpu", torch.float32),
    )
