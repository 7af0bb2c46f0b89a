"""Merge math of the LoRA family: LoRA, rsLoRA, DoRA, AdaLoRA, VeRA, IA3, HiRA.

Pure functions on float32 tensors. Every expression follows peft's own
``get_delta_weight``/``merge`` (peft 0.21) operation by operation, including where a
transpose happens and the order of multiplications, so that on the same device the
results are bit-identical to ``merge_and_unload()`` for a float32 base.

Shapes: a ``Linear`` weight W is (out × in). A GPT-2 ``Conv1D`` weight
(``fan_in_fan_out``) is stored (in × out); deltas are returned in the base's storage
layout. An ``Embedding`` weight is (num_embeddings × dim). LoRA A is (r × in), B is (out × r).
"""

from __future__ import annotations

import math

import torch


def _t(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


@torch.no_grad()
def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *, fan_in_fan_out: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW = s·B·A in the base's layout. A: (r × in), B: (out × r); s = α/r (rsLoRA α/√r).
    ``out``: optional (out × in) float32 buffer for B·A."""
    product = lora_B @ lora_A if out is None else torch.matmul(lora_B, lora_A, out=out)
    return _t(product, fan_in_fan_out).mul_(scaling)  # in place: same bits as peft's `* scaling`


@torch.no_grad()
def lora_delta_rows(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, rows: slice, *,
                    fan_in_fan_out: bool = False, out: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of :func:`lora_delta` (in the base's layout) into ``out`` (flat float32, at least that many
    elements), without the whole ΔW. The same bits as slicing the whole one for blocks of four rows or more
    (a one-row product takes a matrix-vector kernel; tested in tests/test_merge_stream.py)."""
    if fan_in_fan_out:  # W is (in × out): its rows are columns of B·A
        block = torch.matmul(lora_B, lora_A[:, rows])
        view = out[: block.numel()].view(block.shape[1], block.shape[0])
        view.copy_(block.T)
    else:
        count = len(range(*rows.indices(lora_B.shape[0])))
        view = out[: count * lora_A.shape[1]].view(count, lora_A.shape[1])
        torch.matmul(lora_B[rows], lora_A, out=view)
    return view.mul_(scaling).view(-1)


@torch.no_grad()
def lora_embedding_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = s·(B·A)ᵀ for an embedding. A: (r × num_embeddings), B: (dim × r) -> (num_embeddings × dim)."""
    return (lora_B @ lora_A).T.mul_(scaling)


@torch.no_grad()
def dora_merge(
    weight: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
    *, fan_in_fan_out: bool = False, embedding: bool = False,
) -> torch.Tensor:
    """W' = (m / ‖V‖) ⊙ (W + ΔW) with V = W₀ + ΔW, the norm per output row (per embedding column).

    ``weight`` is the weight merged so far, ``base`` the unmerged base W₀ (peft takes the
    norm on the unmerged weight); both in the base's layout, float32. ``magnitude``: (out,) or (dim,).
    """
    if embedding:
        norm = torch.linalg.norm(base.T + delta.T, dim=1)
        factor = (magnitude / norm).view(1, -1)
    else:
        norm = torch.linalg.norm(_t(base, fan_in_fan_out) + _t(delta, fan_in_fan_out), dim=1)
        factor = _t((magnitude / norm).view(-1, 1), fan_in_fan_out)
    return factor * (weight + delta)


@torch.no_grad()
def adalora_delta(
    lora_A: torch.Tensor, lora_B: torch.Tensor, lora_E: torch.Tensor, scaling: float, ranknum: float,
    *, fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """ΔW = B·(A ⊙ E)·c/(init_r + 1e-5). A: (r × in), E: (r × 1), B: (out × r); r may be pruned below init_r."""
    denom = torch.full((1,), float(ranknum), dtype=lora_A.dtype, device=lora_A.device) + 1e-5
    return _t(lora_B @ (lora_A * lora_E), fan_in_fan_out) * scaling / denom


@torch.no_grad()
def vera_delta(
    vera_A: torch.Tensor, vera_B: torch.Tensor, lambda_b: torch.Tensor, lambda_d: torch.Tensor,
    *, in_features: int, out_features: int, fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """ΔW = (λ_b ⊙ B[:out]) · (λ_d ⊙ A[:, :in]).

    Shared A: (r × max_in), B: (max_out × r); λ_b: (out,), λ_d: (r,).
    """
    sliced_A = vera_A[:, :in_features]
    sliced_B = vera_B[:out_features, :]
    return _t((lambda_b.unsqueeze(-1) * sliced_B) @ (lambda_d.unsqueeze(-1) * sliced_A), fan_in_fan_out)


def vera_projection(prng_key: int, r: int, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's frozen projections regenerated from ``projection_prng_key`` exactly as peft draws them
    (kaiming-uniform from one CPU generator, A then B): A (r × in), B (out × r), float32."""
    generator = torch.Generator(device="cpu").manual_seed(prng_key)

    def kaiming(shape: tuple[int, int]) -> torch.Tensor:
        std = math.sqrt(2) / math.sqrt(shape[1])
        bound = math.sqrt(3.0) * std
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)

    vera_A = kaiming((r, in_features))
    vera_B = kaiming((out_features, r))
    return vera_A, vera_B


@torch.no_grad()
def ia3_vector(ia3_l: torch.Tensor, weight: float) -> torch.Tensor:
    """The scaling vector with an adapter weight w: l itself for w = 1, else 1 + w·(l − 1)."""
    return ia3_l if weight == 1.0 else 1.0 + weight * (ia3_l - 1.0)


@torch.no_grad()
def ia3_merge(weight: torch.Tensor, ia3_l: torch.Tensor, *, fan_in_fan_out: bool = False) -> torch.Tensor:
    """W' = W ⊙ l. l: (out × 1), or (1 × in) for a feed-forward module."""
    return torch.mul(weight, _t(ia3_l, fan_in_fan_out))


@torch.no_grad()
def ia3_bias(bias: torch.Tensor, ia3_l: torch.Tensor) -> torch.Tensor:
    """b' = b ⊙ l for a non-feed-forward IA3 module. bias: (out,), l: (out × 1)."""
    return torch.mul(bias, ia3_l.reshape(bias.shape))


@torch.no_grad()
def hira_delta(hira_A: torch.Tensor, hira_B: torch.Tensor, *, fan_in_fan_out: bool = False,
               embedding: bool = False) -> torch.Tensor:
    """B·A in the base's layout (transposed for Conv1D and embeddings). A: (r × in), B: (out × r)."""
    return _t(hira_B @ hira_A, fan_in_fan_out or embedding)


@torch.no_grad()
def hira_merge(weight: torch.Tensor, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W' = W + W₀ ⊙ (B·A), W₀ the unmerged base (as peft)."""
    return weight + base * delta
