"""Merge math of the LyCORIS family in peft: LoHa and LoKr (linear layers).

Pure functions on float32 tensors, following peft's ``make_weight``/``make_kron``
operation by operation so that results are bit-identical to ``merge_and_unload()``.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def loha_delta(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scaling: float,
    shape: tuple[int, ...],
) -> torch.Tensor:
    """ΔW = (w1a·w1b) ⊙ (w2a·w2b)·α/r, reshaped to the base ``shape``. w*a: (out × r), w*b: (r × in)."""
    scale = torch.tensor(scaling, dtype=torch.float32, device=w1a.device)
    return (((w1a @ w1b) * (w2a @ w2b)) * scale).reshape(shape)


@torch.no_grad()
def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scaling: float, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW = kron(w1, w2)·α/r, reshaped to the base ``shape``. w1: (out₁ × in₁), w2: (out₂ × in₂)."""
    return (torch.kron(w1, w2.contiguous()) * scaling).reshape(shape)
