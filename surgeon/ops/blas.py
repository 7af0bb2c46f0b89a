"""Thin matrix products (one side ≤ 64 columns) on the CPU, through the BLAS that does them fast.

The iterations of the spectral routes (Krylov, Davidson, the randomised range finder) spend their
time in products of a big matrix with a block of 8-64 vectors. torch's CPU builds do those with
MKL, which on AMD processors runs them 3-4x slower than OpenBLAS (measured on the 2-core AMD EPYC
these benchmarks run on, float64 5632 x 2048 times 2048 x 16: MKL 87-112 ms, OpenBLAS 33 ms; the
transposed product 117-150 ms against 36 ms), and OpenBLAS at 40% of the processor's peak. So float64
products of 3-64 columns go to surgeon's own kernel (:mod:`surgeon.ops.native_thin`, 2-2.5x OpenBLAS)
where it could be built (float32 ones stay with OpenBLAS, whose SGEMM runs them near its peak). numpy's
wheels carry OpenBLAS, so once :func:`use_numpy_blas` is on, :func:`mm` hands the other thin products to
numpy (zero-copy views both ways); otherwise, and for every other product, it is ``a @ b``. Whether it is
on is decided once per process from the installation and the processor (never from timings, so every
process on a machine computes the same bits) by :func:`surgeon.workflows.device.configure_cpu_blas`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from surgeon.ops import lapack
from surgeon.ops.native_thin import thin_mm

THIN = 64  # products whose narrow side is at most this many columns/rows
NATIVE_FROM = 2  # products this narrow stay matrix-vector products of the BLAS (at the memory's speed)

# numpy's BLAS thread setter (or True where it has none) while thin CPU products go to numpy; None: torch's
_route: list[object | None] = [None]
_threads = [0]


def use_numpy_blas(setter: object | None) -> None:
    """Send thin CPU products to numpy (``setter``: OpenBLAS's set-num-threads, or True) or back (None).
    Chosen once per process by :func:`surgeon.workflows.device.configure_cpu_blas`."""
    _route[0] = setter
    _threads[0] = 0


def numpy_blas_in_use() -> bool:
    return _route[0] is not None


def _blasable(x: torch.Tensor) -> bool:
    """A 2-D view BLAS takes as it is (rows or columns contiguous)."""
    s0, s1 = x.stride()
    r, c = x.shape
    return (s1 == 1 and s0 >= max(c, 1)) or (s0 == 1 and s1 >= max(r, 1))


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D tensors; thin float32/float64 CPU products through numpy's BLAS where it is faster."""
    if (a.device.type != "cpu" or a.dtype != b.dtype or a.dtype not in (torch.float64, torch.float32)
            or a.dim() != 2 or b.dim() != 2 or min(a.shape[0], b.shape[1]) > THIN or a.requires_grad
            or b.requires_grad or 0 in a.shape or 0 in b.shape):
        return a @ b
    if min(a.shape[0], b.shape[1]) > NATIVE_FROM and a.dtype == torch.float64:
        out = thin_mm(a, b)
        if out is not None:
            return out
    if _route[0] is None:
        return a @ b
    _numpy_threads()  # as many threads as torch has
    a = a if _blasable(a) else a.contiguous()
    b = b if _blasable(b) else b.contiguous()
    # the product lands in torch's memory (64-byte aligned): MKL's later results on it can depend on the
    # alignment of their operands, and numpy's own allocations differ from process to process
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
    np.matmul(a.numpy(), b.numpy(), out=out.numpy())
    return out


def _numpy_threads() -> None:
    setter = _route[0]
    if setter is not True and setter is not None and _threads[0] != torch.get_num_threads():
        _threads[0] = torch.get_num_threads()
        setter(_threads[0])  # type: ignore[operator]


def gram_block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀ @ b`` for the blocks of a float64 Gram matrix (big, square-ish products): through numpy's BLAS
    while thin products go there too (OpenBLAS's DGEMM is ~1.5x MKL's on the AMD EPYC), else torch."""
    if _route[0] is None or a.device.type != "cpu" or a.dtype != torch.float64 or b.dtype != torch.float64:
        return a.T @ b
    _numpy_threads()
    out = torch.empty(a.shape[1], b.shape[1], dtype=a.dtype)
    np.matmul(a.numpy().T, b.numpy(), out=out.numpy())
    return out


def self_gram(w: torch.Tensor) -> torch.Tensor | None:
    """The Gram matrix of the smaller side of a float64 CPU ``w`` (WWᵀ or WᵀW) by OpenBLAS's symmetric rank-k
    update (numpy's matmul takes that route for a matrix times its own transpose, and mirrors the computed
    triangle, so the result is exactly symmetric), while thin products go to numpy; else None. No transposed
    copy of ``w`` is made: 2048 x 5632 in 0.43 s against 0.77 s by blocks of GEMMs."""
    if _route[0] is None or w.device.type != "cpu" or w.dtype != torch.float64 or w.requires_grad or w.dim() != 2:
        return None
    _numpy_threads()
    a = w.numpy()
    n = min(w.shape)
    out = torch.empty(n, n, dtype=w.dtype)
    np.matmul(a, a.T, out=out.numpy()) if w.shape[0] <= w.shape[1] else np.matmul(a.T, a, out=out.numpy())
    return out


def symmetric_eigh(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues ascending, eigenvectors) of a symmetric float64 CPU matrix: numpy's OpenBLAS LAPACK
    while thin products go to numpy (:func:`surgeon.ops.lapack.eigh`, dsyevd's steps with surgeon's
    back-transformation, 1.2x dsyevd at N = 2048; dsyevd itself where LAPACKE is missing), else
    ``torch.linalg.eigh``. One choice per process, so every
    process on a machine gets the same bits."""
    if _route[0] is None or g.device.type != "cpu" or g.dtype != torch.float64 or g.requires_grad:
        return torch.linalg.eigh(g)
    _numpy_threads()
    split = lapack.eigh(g.numpy())  # dsyevd's three steps with a faster last one, where LAPACKE is at hand
    values, vectors = split if split is not None else np.linalg.eigh(g.numpy())
    return torch.from_numpy(values), torch.from_numpy(vectors)


def symmetric_top(g: torch.Tensor, choose: Callable[[torch.Tensor], int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(every eigenvalue ascending, the eigenvectors of the k largest, largest first) of a symmetric float64
    matrix, k = ``choose(eigenvalues)``: on numpy's route the tridiagonal eigenvalues and only k vectors
    (:func:`surgeon.ops.lapack.eigh_top`), else a full ``torch.linalg.eigh``."""
    if _route[0] is not None and g.device.type == "cpu" and g.dtype == torch.float64 and not g.requires_grad:
        _numpy_threads()
        found = lapack.eigh_top(g.numpy(), lambda values: choose(torch.from_numpy(values)))
        if found is not None:
            values, vectors = found
            return torch.from_numpy(values), torch.from_numpy(vectors).flip(1)
    values, vectors = torch.linalg.eigh(g)
    return values, vectors.flip(1)[:, :choose(values)]


__all__ = ["THIN", "gram_block", "mm", "numpy_blas_in_use", "self_gram", "symmetric_eigh", "symmetric_top", "use_numpy_blas"]
