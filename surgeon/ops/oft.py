"""OFT's merge, block by block: ``W @ R^T`` for a block-diagonal rotation R without the dense product.

peft merges an OFT module as ``mm(R, W^T)^T`` with R the (in x in) block diagonal of the rotation
blocks: a full GEMM whose terms are mostly exact zeros. Each output element is a chain of fused
multiply-adds over the in-features; the zero terms add exact zeros, so the element equals the chain
over its own block alone -- which a product of the (out x b) slice with the (b x b) block computes,
as long as both BLAS calls accumulate that short range in the same order.

Whether they do is a property of the BLAS kernel MKL picks for the shapes, not of the values:
measured with torch 2.13 / MKL 2024.2 on AVX-512 at 1 and 2 threads over blocks 2 ... 256,
in-features 24 ... 2048 and out-features 1 ... 2048, 402 of 576 shapes match; the others are
one-row outputs (MKL's gemv), 2-, 3- and 4-wide blocks on layers with few outputs (MKL's small-matrix
kernels) and 128-/256-wide blocks that straddle MKL's 384-wide split of the inner dimension (1024
and 2048 in-features), some at one thread count only. So no table is trusted:
:func:`block_route_exact` measures each (out, in, block, threads) once, on random data, against the
dense product itself, and only a shape that matches bit for bit takes the block route. Two value
cases the shape probe cannot see are left to the dense product by :func:`rotate_blocks`: a
non-finite weight (the dense product spreads ``inf * 0 = nan`` over the whole row) and an exact zero
result (its sign depends on the zero terms the block product skips).
"""

from __future__ import annotations

import torch

from surgeon.ops.threads import torch_threads

_MEASURED: dict[tuple[int, int, int, int], bool] = {}


def _skew(vectors: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size*(size-1)/2) upper-triangle entries -> (n, size, size) skew-symmetric matrices."""
    rows, cols = torch.triu_indices(size, size, 1)
    upper = torch.zeros(vectors.shape[0], size, size, dtype=vectors.dtype)
    upper[:, rows, cols] = vectors
    return upper - upper.transpose(-2, -1)


def _constrain(vectors: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """COFT: each skew block pulled into the ball of radius eps / sqrt(n) around zero."""
    rows, cols = torch.triu_indices(size, size, 1)
    skew = _skew(vectors, size)
    radius = eps * 1 / torch.sqrt(torch.tensor(skew.shape[0]))
    zero = torch.zeros((size, size), dtype=skew.dtype).unsqueeze(0).expand_as(skew)
    norm = torch.norm(skew - zero, dim=(1, 2), keepdim=True)
    kept = torch.where((norm <= radius).bool(), skew, zero + radius * ((skew - zero) / norm))
    return kept[:, rows, cols]


def rotation_blocks(vectors: torch.Tensor, size: int, *, coft: bool = False, eps: float = 6e-5,
                    neumann: bool = True, terms: int = 5) -> torch.Tensor:
    """OFT's rotation blocks (n, size, size) from its saved parameters (n, size*(size-1)/2), in peft's order
    of operations (its bits): Q skew-symmetric, R = (I + Q)^-1 (I - Q) solved exactly, or its Neumann
    series I + 2Q + 2Q^2 + ... + 2Q^(terms-2) + Q^(terms-1); ``coft`` first constrains Q."""
    if coft:
        vectors = _constrain(vectors, size, eps)
    skew = _skew(vectors, size)
    count = vectors.shape[0]
    if not neumann:
        eye = torch.eye(size).unsqueeze(0).expand(count, size, size)
        return torch.linalg.solve(eye + skew, eye - skew, left=False).to(vectors.dtype)
    rotation = torch.eye(size, dtype=vectors.dtype).repeat(count, 1, 1)
    if terms > 1:
        rotation.add_(skew, alpha=2.0)
    if terms > 2:
        power = torch.bmm(skew, skew)
        rotation.add_(power, alpha=2.0)
        for _ in range(3, terms - 1):
            power = torch.bmm(power, skew)
            rotation.add_(power, alpha=2.0)
        power = torch.bmm(power, skew)
        rotation.add_(power)
    return rotation


def dense_rotate(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``mm(R, W^T)^T`` with R the block diagonal of ``blocks`` (n, b, b): the dense reference."""
    return torch.mm(torch.block_diag(*blocks), weight.t()).t()


def _block_product(weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    out, features = weight.shape
    count, size, _ = blocks.shape
    slices = weight.view(out, count, size).permute(1, 2, 0)  # (n, b, out): block j's columns of W^T
    return torch.bmm(blocks, slices).reshape(features, out).t()


def block_route_exact(out: int, features: int, size: int, *, threads: int) -> bool:
    """Whether the block product gives the dense product's bits for a (out x features) float32 weight
    with ``size``-wide blocks at ``threads`` torch threads: measured once per shape, on random data."""
    key = (out, features, size, threads)
    if key not in _MEASURED:
        gen = torch.Generator().manual_seed(1234 + size)
        weight = torch.randn(out, features, generator=gen)
        blocks = torch.randn(features // size, size, size, generator=gen)
        with torch_threads(threads):
            _MEASURED[key] = torch.equal(dense_rotate(weight, blocks), _block_product(weight, blocks))
    return _MEASURED[key]


def rotate_blocks(weight: torch.Tensor, blocks: torch.Tensor, *, threads: int) -> torch.Tensor | None:
    """``weight`` (out x in, float32) times the block-diagonal rotation of ``blocks`` (n, b, b, float32) as
    peft's OFT merge computes it, bit for bit; None where the block route is not known to match (then
    the caller takes the dense product)."""
    out, features = weight.shape
    count, size, _ = blocks.shape
    if weight.dtype != torch.float32 or blocks.dtype != torch.float32 or count * size != features or out < 1:
        return None
    if not block_route_exact(out, features, size, threads=threads) or not bool(torch.isfinite(weight).all()):
        return None
    with torch_threads(threads):
        weight = weight.contiguous() if weight.data_ptr() % 64 == 0 else weight.clone()  # aligned, as peft's copy
        merged = _block_product(weight.contiguous(), blocks.contiguous())
    if bool((merged == 0).any()):
        return None
    return merged
