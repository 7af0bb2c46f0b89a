"""The symmetric eigendecomposition of a base's Gram matrix, in three steps of numpy's OpenBLAS LAPACK.

A complete base basis (N = 2048 on the 1.1B model) is the Gram matrix's eigendecomposition, which LAPACK's
``dsyevd`` does as three steps: the reduction to tridiagonal form G = H·T·Hᵀ (``dsytrd``), the tridiagonal
eigenvectors T = Z·Λ·Zᵀ (divide and conquer, ``dstedc``), and the back-transformation H·Z (``dormtr``).
On the 2-core AMD EPYC the benchmarks run on, these take 0.44, 0.32 and 0.70 s of 1.5 s: the last is 2N³
flops done at 24 GFLOP/s, through block reflectors 32 wide. :func:`eigh` calls the first two through the
LAPACKE interface of the OpenBLAS library numpy's wheel carries (ctypes, no build) and does the third
itself: H as block reflectors I − V·T·Vᵀ of ``BLOCK`` Householder vectors each (T from the identity
T⁻¹ = striu(VᵀV) + diag(1/τ)), applied to Z with two large GEMMs per block, 0.35-0.45 s. Same steps as
``dsyevd``, so the same accuracy (eigenvalues identical, eigenvectors equal to rounding).

Where the library or a symbol is missing, :func:`eigh` returns None and the caller keeps numpy's ``eigh``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable

import numpy as np

BLOCK = 256  # Householder vectors per block reflector in the back-transformation
THIN_BLOCK = 64  # the same for a few vectors (eigh_top)
_COL_MAJOR = 102

_lock = threading.Lock()
_loaded: list[tuple[object, object, type] | None] = []


def numpy_openblas() -> ctypes.CDLL | None:
    """The OpenBLAS library numpy's wheel carries (``numpy.libs``), or None (another BLAS, another layout)."""
    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    try:
        names = sorted(n for n in os.listdir(libs) if "openblas" in n and ".so" in n)
    except OSError:
        return None
    for name in names:
        try:
            return ctypes.CDLL(os.path.join(libs, name))
        except OSError:
            continue
    return None


class _Lapacke:
    """The routines :func:`eigh` and :func:`eigh_top` call, their argument types declared, and the integer type."""

    def __init__(self, sytrd: ctypes._CFuncPtr, stedc: ctypes._CFuncPtr, dgemm: ctypes._CFuncPtr,
                 sterf: ctypes._CFuncPtr, stemr: ctypes._CFuncPtr, integer: type) -> None:
        self.sytrd, self.stedc, self.dgemm, self.integer = sytrd, stedc, dgemm, integer
        self.sterf, self.stemr = sterf, stemr


def _symbols() -> _Lapacke | None:
    """numpy's OpenBLAS's dsytrd and dstedc (LAPACKE) and cblas_dgemm, once per process; None where absent."""
    with _lock:
        if not _loaded:
            _loaded.append(_find())
        return _loaded[0]


def _find() -> _Lapacke | None:
    lib = numpy_openblas()
    if lib is None:
        return None
    # numpy >= 2 wheels: scipy-openblas, 64-bit integers and a prefix; older ILP64 builds: the 64_ suffix only
    for prefix, suffix, integer in (("scipy_", "64_", ctypes.c_int64), ("", "64_", ctypes.c_int64),
                                    ("scipy_", "", ctypes.c_int32), ("", "", ctypes.c_int32)):
        sytrd = getattr(lib, f"{prefix}LAPACKE_dsytrd{suffix}", None)
        stedc = getattr(lib, f"{prefix}LAPACKE_dstedc{suffix}", None)
        dgemm = getattr(lib, f"{prefix}cblas_dgemm{suffix}", None)
        sterf = getattr(lib, f"{prefix}LAPACKE_dsterf{suffix}", None)
        stemr = getattr(lib, f"{prefix}LAPACKE_dstemr{suffix}", None)
        if None in (sytrd, stedc, dgemm, sterf, stemr):
            continue
        p, c, i, f = ctypes.c_void_p, ctypes.c_char, integer, ctypes.c_double
        sytrd.argtypes = [ctypes.c_int, c, i, p, i, p, p, p]
        sytrd.restype = i
        stedc.argtypes = [ctypes.c_int, c, i, p, p, p, i]
        stedc.restype = i
        dgemm.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i, f, p, i, p, i, f, p, i]
        dgemm.restype = None
        sterf.argtypes = [i, p, p]
        sterf.restype = i
        # layout, jobz, range, n, d, e, vl, vu, il, iu, *m, w, z, ldz, nzc, isuppz, *tryrac
        stemr.argtypes = [ctypes.c_int, c, c, i, p, p, f, f, i, i, p, p, p, i, i, p, p]
        stemr.restype = i
        return _Lapacke(sytrd, stedc, dgemm, sterf, stemr, integer)
    return None


def available() -> bool:
    return _symbols() is not None


def eigh(g: np.ndarray, *, block: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(eigenvalues ascending, eigenvectors as columns) of a symmetric float64 matrix ``g`` (N × N, only its
    lower triangle is read; ``g`` is not modified), or None where LAPACKE is not at hand (module doc). The
    threads are OpenBLAS's current setting. The eigenvectors come in column-major order (a transposed view)."""
    lapacke = _symbols()
    n = int(g.shape[0])
    if lapacke is None or g.ndim != 2 or g.shape[1] != n or g.dtype != np.float64:
        return None
    if n < 2:
        return g.diagonal().copy(), np.ones((n, n))
    reduced = _tridiagonal(lapacke, g)
    if reduced is None:
        return None
    a, d, e, tau = reduced
    z = np.empty((n, n), order="F")
    if lapacke.stedc(_COL_MAJOR, b"I", n, _ptr(d), _ptr(e), _ptr(z), n) != 0:  # type: ignore[call-arg]
        return None  # a divide and conquer that did not converge: numpy's eigh reports it its own way
    apply_reflectors(a, tau, z.T, block=block)
    return d, z


def eigh_top(g: np.ndarray, k: int | Callable[[np.ndarray], int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(every eigenvalue ascending, the eigenvectors of the ``k`` largest as columns, largest last) of a
    symmetric float64 ``g`` (lower triangle read, not modified), or None without LAPACKE. For a truncated
    factorisation that needs the whole spectrum (ranks, energies) but few vectors: the reduction to tridiagonal
    form, its eigenvalues (``dsterf``), ``k`` eigenvectors by MRRR (``dstemr``) and H applied to those only
    (N = 384, k = 16: ~12 ms against dsyevd's 22 on one thread; N = 1536: 2x). ``k`` may be a function of
    the eigenvalues (ascending) that returns the count."""
    lapacke = _symbols()
    n = int(g.shape[0])
    if lapacke is None or g.ndim != 2 or g.shape[1] != n or g.dtype != np.float64 or n < 2:
        return None
    reduced = _tridiagonal(lapacke, g)
    if reduced is None:
        return None
    a, d, e, tau = reduced
    values, off = d.copy(), e.copy()
    if lapacke.sterf(n, _ptr(values), _ptr(off)) != 0:  # type: ignore[call-arg]
        return None
    k = k(values) if callable(k) else k  # ``k`` may be chosen from the spectrum
    if not 0 <= k <= n:
        raise ValueError(f"eigh_top: k = {k} for a {n} x {n} matrix")
    if k == 0:
        return values, np.empty((n, 0))
    integer = lapacke.integer
    found, tryrac = integer(0), integer(1)
    w, e_n = np.empty(n), np.append(e, 0.0)  # dstemr wants e of length n (workspace at the end)
    z = np.empty((k, n))  # column-major n × k: its transpose row-major
    isuppz = np.empty(2 * k, dtype=np.int64 if integer is ctypes.c_int64 else np.int32)
    status = lapacke.stemr(_COL_MAJOR, b"V", b"I", n, _ptr(d), _ptr(e_n), 0.0, 0.0, n - k + 1, n,  # type: ignore[call-arg]
                           ctypes.byref(found), _ptr(w), _ptr(z), n, k, _ptr(isuppz), ctypes.byref(tryrac))
    if status != 0 or found.value != k:
        return None
    apply_reflectors(a, tau, z)  # z is Zᵀ row-major (k × n): H·Z in place
    return values, z.T


def _tridiagonal(lapacke: _Lapacke, g: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """dsytrd (lower) on a column-major copy of ``g``: (reflectors in its strict lower triangle, the diagonal,
    the off-diagonal, τ), or None where LAPACK reports an error."""
    n = int(g.shape[0])
    a = np.array(g, order="F", copy=True)  # overwritten by the reflectors
    d, e, tau = np.empty(n), np.empty(n - 1), np.empty(n - 1)
    if lapacke.sytrd(_COL_MAJOR, b"L", n, _ptr(a), n, _ptr(d), _ptr(e), _ptr(tau)) != 0:  # type: ignore[call-arg]
        return None
    return a, d, e, tau


def apply_reflectors(a: np.ndarray, tau: np.ndarray, ct: np.ndarray, *, block: int | None = None) -> None:
    """C ← H·C in place, given Cᵀ (``ct``, p × N, C-contiguous), for H = H(1)···H(N−1), the reflectors
    ``dsytrd`` (lower) leaves in ``a``'s strict lower triangle with ``tau``: H(i) = I − τ_i·v_i·v_iᵀ,
    v_i = (0…0, 1, a[i+2:, i]) with the 1 at row i+1. By blocks of ``block`` reflectors, last block first:
    Cᵀ ← Cᵀ − (CᵀV)·Tᵀ·Vᵀ on the columns the block touches (the last product accumulates into Cᵀ). Default
    ``block``: ``BLOCK`` for a wide C; ``THIN_BLOCK`` for under 128 columns, where forming T (block²·N per block)
    outweighs applying it (3.4 ms against 10 ms for N = 384, 16 columns)."""
    lapacke = _symbols()
    if lapacke is None or not ct.flags.c_contiguous:
        raise ValueError("apply_reflectors needs numpy's OpenBLAS and a C-contiguous Cᵀ")
    n, p = a.shape[0], ct.shape[0]
    block = block or (BLOCK if p >= 128 else THIN_BLOCK)
    for j0 in reversed(range(0, n - 1, block)):
        j1 = min(j0 + block, n - 1)
        r, width = j0 + 1, j1 - j0
        v = np.tril(a[r:, j0:j1], -1)  # reflector j0+k's vector: 1 at row k of the block, stored entries below
        diagonal = np.arange(width)
        v[diagonal, diagonal] = 1.0
        t = tau[j0:j1]
        v[:, t == 0.0] = 0.0  # τ = 0: H(i) = I (dsytrd's last reflector, and any column already reduced)
        t_inv = np.triu(v.T @ v, 1)
        t_inv[diagonal, diagonal] = 1.0 / np.where(t == 0.0, 1.0, t)
        x = np.ascontiguousarray((ct[:, r:] @ v) @ np.triu(np.linalg.inv(t_inv)).T)  # (CᵀV)·Tᵀ, p × width
        # Cᵀ[:, r:] −= X·Vᵀ: row-major dgemm, B = V (rows of length width) transposed, beta = 1
        lapacke.dgemm(101, 111, 112, p, n - r, width, -1.0, _ptr(x), width, _ptr(v), width, 1.0,  # type: ignore[call-arg]
                      ct.ctypes.data + 8 * r, n)


def _ptr(x: np.ndarray) -> int:
    return int(x.ctypes.data)


__all__ = ["BLOCK", "apply_reflectors", "available", "eigh", "eigh_top", "numpy_openblas"]
