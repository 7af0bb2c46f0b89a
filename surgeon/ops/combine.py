"""The math of combining task vectors and adapters: peft's and mergekit's merge methods.

Pure functions on float32 tensors. Two families, each with its library's semantics:

* ``peft_*``: ``peft.utils.merge_utils`` as ``add_weighted_adapter`` uses it on LoRA
  factors or on ΔW (magnitude pruning keeps ``int(density·n)`` values, DARE rescales by
  1/density, TIES elects the sign on the *unweighted* pruned tensors and divides by the
  count of agreeing tensors).
* mergekit's generalized task arithmetic, written per block of rows so that a tensor of any
  size streams: a :class:`KeepRule` per input (thresholds and rescale factor decided from
  the whole τ first: the kept set of the magnitude methods exactly mergekit's, ties included), then
  :func:`sparsify_block` and :func:`consensus_block` on blocks
  (mergekit keeps ``max(1, int(density·n))`` values, rescales by the L1-norm ratio, elects
  the sign on the *weighted* deltas and divides by the sum of agreeing weights).

Random masks come from :mod:`surgeon.ops.counter_rng` (keyed by seed and tensor name), so
they do not depend on chunking, visiting order or device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy
import torch

from surgeon.ops import native_gta
from surgeon.ops.counter_rng import bernoulli_mask

_RESCALE_EPS = 1e-7  # mergekit: below this L1 norm (before or after masking) no rescale


# -- peft's merge_utils semantics (whole tensors) ------------------------------------------------
@torch.no_grad()
def peft_magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density·numel)`` largest-magnitude values (all of them for density ≥ 1)."""
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    keep = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    keep[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = True
    return tensor * keep.reshape(tensor.shape)


@torch.no_grad()
def peft_random_prune(tensor: torch.Tensor, density: float, key: int) -> torch.Tensor:
    """DARE as peft: each value kept with probability ``density`` (counter-RNG ``key``), kept values / density."""
    if density >= 1:
        return tensor
    keep = bernoulli_mask(key, 0, tuple(tensor.shape), density).to(tensor.device)
    return tensor * keep / density


@torch.no_grad()
def peft_majority_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Which entries agree with the elected sign; ``stacked`` (n × ...), method total|frequency."""
    sign = stacked.sign()
    weight = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(weight >= 0, 1.0, -1.0)


@torch.no_grad()
def peft_combine(tensors: Sequence[torch.Tensor], weights: Sequence[float], method: str, *,
                 density: float = 1.0, majority_sign: str = "total",
                 key_of: Callable[[int], int] | None = None) -> torch.Tensor:
    """One of peft's task-arithmetic family on same-shaped tensors: linear, ties, dare_linear, dare_ties,
    magnitude_prune (the ``_svd`` variants call this on ΔW first). ``key_of(i)``: the DARE stream of input i."""
    if method in ("ties", "magnitude_prune"):
        tensors = [peft_magnitude_prune(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        if key_of is None:
            raise ValueError("DARE needs key_of for its masks")
        tensors = [peft_random_prune(t, density, key_of(i)) for i, t in enumerate(tensors)]
    elif method != "linear":
        raise ValueError(f"unknown peft combination {method!r}")
    stacked = torch.stack(list(tensors))
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if method in ("ties", "dare_ties"):
        agree = peft_majority_mask(stacked, majority_sign)
        return (stacked * w * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)
    return (stacked * w).sum(dim=0)


@torch.no_grad()
def svd_factors(delta: torch.Tensor, rank: int, *, clamp: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B·A the rank-``rank`` truncation of ``delta`` (out × in), as peft's ``_svd`` combinations:
    B = U·diag(S), A = Vᴴ, then both clamped to ±quantile(|entries of B and A|, clamp) when ``clamp`` is given."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    B = U[:, :rank] @ torch.diag(S[:rank])
    A = Vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return A, B


@torch.no_grad()
def lowrank_svd_factors(lora_B: torch.Tensor, lora_A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the rank-``rank`` truncated SVD of ΔW = ``lora_B`` (out × R) · ``lora_A`` (R × in) without
    forming ΔW: QR of both factors, SVD of the R × R core in float64 (exact up to rounding; R ≪ out, in).
    B = U·diag(S), A = Vᴴ as :func:`svd_factors`; fewer than ``rank`` columns when R < rank."""
    q_b, r_b = torch.linalg.qr(lora_B)
    q_a, r_a = torch.linalg.qr(lora_A.T)
    u, s, vh = torch.linalg.svd((r_b.double() @ r_a.double().T), full_matrices=False)
    k = min(rank, s.numel())
    B = q_b @ (u[:, :k] * s[:k]).to(lora_B.dtype)
    A = (vh[:k].to(lora_A.dtype) @ q_a.T)
    return A, B


def energy_rank(singular_values: torch.Tensor, fraction: float) -> int:
    """Smallest k whose top-k singular values hold ``fraction`` of Σσ² (peft's convert_to_lora threshold)."""
    energy = torch.cumsum(singular_values.double() ** 2, dim=0)
    return int(torch.searchsorted(energy, fraction * energy[-1]).item()) + 1


@torch.no_grad()
def lora_from_delta(delta: torch.Tensor, rank: int | float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A, B, k): ΔW ≈ B·A with k = ``rank`` (int) or the energy rank of a fraction (float), as convert_to_lora."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = rank if isinstance(rank, int) else energy_rank(S, rank)
    k = min(k, S.numel())
    return Vh[:k].contiguous(), (U[:, :k] * S[:k]).contiguous(), k


# -- mergekit's generalized task arithmetic (streamed per block of rows) --------------------------
@dataclass(frozen=True)
class KeepRule:
    """How one input's τ is sparsified, decided from the whole τ before any block is combined.

    ``kind``: all | mask (``mask``: bits of the kept elements of the flattened τ, :func:`magnitude_mask`:
    magnitude, breadcrumbs) | random (DARE, Bernoulli(density)) | della (per-row rank-dependent probability).
    ``scale`` multiplies the kept values (L1 rescale).
    """

    kind: str
    density: float = 1.0
    epsilon: float = 0.0
    key: int = 0
    scale: float = 1.0
    mask: torch.Tensor | None = field(default=None, compare=False, repr=False)


def sorted_positions(numel: int, density: float, *, method: str, gamma: float = 0.01) -> tuple[bool, int, int]:
    """(descending, lo, hi): mergekit keeps the elements its sort of |τ| puts at positions [lo, hi):
    ``magnitude`` the ``max(1, int(density·n))`` first of a descending sort, ``magnitude_outliers``
    (breadcrumbs) positions [n − target − top, n − top) of an ascending one, target = int(density·n) and
    top = int(gamma·n) (fewer outliers dropped when the density asks for more)."""
    if method == "magnitude":
        return True, 0, max(1, int(density * numel))
    target, top = int(density * numel), int(gamma * numel)
    bottom = max(0, numel - target - top)
    return False, bottom, bottom + target


def magnitude_mask(flat_abs: torch.Tensor, density: float, *, method: str, gamma: float = 0.01
                   ) -> tuple[torch.Tensor, float]:
    """(kept bits, Σ kept |τ| in float64): exactly the elements mergekit keeps, ties at the threshold included,
    for |τ| flattened in float32 on the CPU (``flat_abs``, left unchanged); bit i (little-endian bit order,
    :func:`unpack_bits`) is element i. mergekit takes them from torch's sort, which is not stable, so which
    of many equal magnitudes it keeps is that sort's order: the native kernel carries out only the
    partitions of that sort that hold a boundary, else torch's sort decides."""
    lib = native_gta.kernel()
    if lib is None:
        return _sorted_mask(flat_abs, *sorted_positions(flat_abs.numel(), density, method=method, gamma=gamma))
    pairs = native_gta.pairs_buffer(flat_abs.numel())
    lib.fill_pairs(flat_abs.numpy().ctypes.data, flat_abs.numel(), pairs.ctypes.data)
    return magnitude_mask_pairs(pairs, density, method=method, gamma=gamma, values=lambda: flat_abs)


def magnitude_mask_pairs(pairs: numpy.ndarray, density: float, *, method: str, gamma: float = 0.01,
                         values: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """:func:`magnitude_mask` from (|τ|, index) pairs (:func:`native_gta.tau_abs_pairs`, permuted here);
    ``values()`` gives |τ| again for torch's sort where the kernel cannot finish (its heapsort depth)."""
    descending, lo, hi = sorted_positions(pairs.size, density, method=method, gamma=gamma)
    bits = torch.zeros((pairs.size + 7) // 8, dtype=torch.uint8)
    if hi <= lo:
        return bits, 0.0
    lib = native_gta.kernel()
    total = None if lib is None else native_gta.sorted_range_pairs(
        lib, pairs, descending=descending, lo=lo, hi=hi, bits=bits.numpy())
    if total is not None:
        return bits, total
    return _sorted_mask(values(), descending, lo, hi)


def _sorted_mask(flat_abs: torch.Tensor, descending: bool, lo: int, hi: int) -> tuple[torch.Tensor, float]:
    """What mergekit does: torch's sort of |τ|, the elements at positions [lo, hi) kept (as bits)."""
    kept = torch.zeros(flat_abs.numel(), dtype=torch.bool)
    if hi > lo:
        kept[torch.sort(flat_abs, descending=descending).indices[lo:hi]] = True
    return pack_bits(kept), float(flat_abs[kept].sum(dtype=torch.float64))


def pack_bits(kept: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as bits, little-endian within each byte (bit i of the result is element i)."""
    return torch.from_numpy(numpy.packbits(kept.numpy(), bitorder="little"))


def unpack_bits(bits: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Elements [start, start + count) of a :func:`pack_bits` mask as a bool tensor."""
    first, skip = divmod(start, 8)
    chunk = bits[first:(start + count + 7) // 8 + 1].numpy()
    return torch.from_numpy(numpy.unpackbits(chunk, bitorder="little")[skip:skip + count].astype(bool))


def della_probabilities(block: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability per element of a (rows × width) block, float64: the magnitude rank within its
    row mapped linearly onto [density − ε, density + ε], equal magnitudes ranked as mergekit's argsort ranks
    them (torch's sort on the CPU, per row)."""
    cpu = block.detach().to("cpu", torch.float32).abs()
    order = torch.argsort(cpu, dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cpu.shape[1]).expand_as(order))
    width = max(cpu.shape[1] - 1, 1)
    return (density - epsilon) + (ranks.double() / width).clamp(0, 1) * 2 * epsilon


@torch.no_grad()
def keep_mask(block: torch.Tensor, rule: KeepRule, start: int) -> torch.Tensor | None:
    """Bool mask of the kept entries of ``block`` (rows × width, flat offset ``start``); None keeps all."""
    if rule.kind == "all":
        return None
    if rule.kind == "mask":
        return unpack_bits(rule.mask, start, block.numel()).view(block.shape).to(block.device)
    if rule.kind == "random":
        return bernoulli_mask(rule.key, start, tuple(block.shape), rule.density).to(block.device)
    if rule.kind == "della":
        probs = della_probabilities(block, rule.density, rule.epsilon)
        return bernoulli_mask(rule.key, start, tuple(block.shape), probs).to(block.device)
    raise ValueError(f"unknown keep rule {rule.kind!r}")


@torch.no_grad()
def sparsify_block(block: torch.Tensor, rule: KeepRule, start: int) -> torch.Tensor:
    """τ block with the rule applied: masked, kept values times ``rule.scale`` (float32)."""
    mask = keep_mask(block, rule, start)
    kept = block if mask is None else block * mask
    return kept if rule.scale == 1.0 else kept.mul_(rule.scale)


def l1_scale(before: float, after: float) -> float:
    """mergekit's L1 rescale factor ‖τ‖₁ / ‖masked τ‖₁ (1 when either norm is below 1e-7)."""
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return 1.0
    return before / after


@torch.no_grad()
def consensus_block(deltas: Sequence[torch.Tensor], weights: Sequence[float], *, consensus: str | None,
                    normalize: bool, lambda_scale: float) -> torch.Tensor:
    """Σ of weighted sparsified τ blocks (each already w_i·s(τ_i)), mergekit's way: with ``consensus``
    (sum | count) only entries agreeing with the elected sign count and the divisor is the sum of their
    weights; ``normalize`` divides by that (or by Σw); ``lambda_scale`` multiplies the result."""
    if consensus is not None:
        total = torch.zeros_like(deltas[0])
        for d in deltas:
            total.add_(d if consensus == "sum" else d.sign())
        majority = torch.where(total >= 0, 1.0, -1.0)
        mixed = torch.zeros_like(deltas[0])
        divisor = torch.zeros_like(deltas[0])
        for d, w in zip(deltas, weights):
            agree = d.sign() == majority
            mixed.add_(d * agree)
            divisor.add_(agree.to(d.dtype), alpha=w)
        divisor[divisor == 0] = 1
    else:
        mixed = torch.zeros_like(deltas[0])
        for d in deltas:
            mixed.add_(d)
        weight_sum = float(sum(weights))
        divisor = torch.tensor(1.0 if abs(weight_sum) < 1e-8 else weight_sum, dtype=mixed.dtype)
    if normalize:
        mixed = mixed / divisor
    if lambda_scale != 1:
        mixed = mixed * lambda_scale
    return mixed


# -- interpolations -----------------------------------------------------------------------------
def slerp_coefficients(t: float, norm0: float, norm1: float, dot: float, *, dot_threshold: float = 0.9995,
                       eps: float = 1e-8) -> tuple[float, float]:
    """(c0, c1) with slerp(v0, v1) = c0·v0 + c1·v1 for whole flattened tensors, as mergekit 0.1.5: ``norm0``,
    ``norm1`` their 2-norms, ``dot`` = ⟨v0, v1⟩; nearly collinear or antipodal pairs (|cos| > ``dot_threshold``)
    and norms ≤ ``eps`` (taken as 1) interpolate linearly."""
    n0 = norm0 if norm0 > eps else 1.0
    n1 = norm1 if norm1 > eps else 1.0
    cos = max(-1.0, min(1.0, dot / (n0 * n1)))
    if abs(cos) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def model_stock_ratio(dots: Sequence[Sequence[float]], norms: Sequence[float]) -> float:
    """Model Stock's t = N·cosθ / (1 + (N−1)·cosθ), cosθ the mean pairwise cosine of the N task vectors
    (``dots[i][j]`` = ⟨τ_i, τ_j⟩, ``norms[i]`` = ‖τ_i‖); 0 at the singularity (mergekit keeps the base there)."""
    count = len(norms)
    cosines = [max(-1.0, min(1.0, dots[i][j] / max(norms[i] * norms[j], 1e-6)))
               for i in range(count) for j in range(i + 1, count)]
    cos = sum(cosines) / len(cosines)
    denominator = 1 + (count - 1) * cos
    return 0.0 if abs(denominator) < 1e-6 else count * cos / denominator
