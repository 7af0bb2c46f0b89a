"""Thin matrix products (one side ≤ 64 columns) on the CPU, through the BLAS that does them fast.

The iterations of the spectral routes (Krylov, Davidson, the randomised range finder) spend their
time in products of a big matrix with a block of 8-64 vectors. torch's CPU builds do those with
MKL, which on AMD processors runs them 3-4x slower than OpenBLAS (measured on the 2-core AMD EPYC
these benchmarks run on, float64 5632 x 2048 times 2048 x 16: MKL 87-112 ms, OpenBLAS 33 ms; the
transposed product 117-150 ms against 36 ms). numpy's wheels carry OpenBLAS, so :func:`mm` hands
those products to numpy (zero-copy views both ways) where torch's BLAS is MKL, the processor is
not Intel's and numpy's BLAS is OpenBLAS; everywhere else it is ``a @ b``.

The choice depends only on the installation and the processor, never on timings, so every process
on a machine computes the same bits (the distributed runs' outputs are byte-identical to one
process's). ``SURGEON_NUMPY_BLAS=0`` turns it off, ``=1`` on.
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np
import torch

THIN = 64  # products whose narrow side is at most this many columns/rows


@functools.lru_cache(maxsize=1)
def _numpy_blas() -> object | None:
    """numpy's OpenBLAS thread setter (or True without one) when thin products go to numpy, else None."""
    choice = os.environ.get("SURGEON_NUMPY_BLAS", "").strip()
    if choice == "0":
        return None
    try:
        blas = str(np.__config__.CONFIG["Build Dependencies"]["blas"]["name"]).lower()  # type: ignore[attr-defined]
    except (AttributeError, KeyError, TypeError):
        blas = ""
    if choice != "1":
        if "openblas" not in blas or not torch.backends.mkl.is_available() or _intel_cpu():
            return None
    return _thread_setter() or True


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return True  # unknown: leave torch's BLAS alone


def _thread_setter() -> object | None:
    """OpenBLAS's set-num-threads of the library numpy loaded (its symbol names vary by build)."""
    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    try:
        names = [n for n in os.listdir(libs) if "openblas" in n and ".so" in n]
    except OSError:
        return None
    for name in names:
        try:
            lib = ctypes.CDLL(os.path.join(libs, name))
        except OSError:
            continue
        for symbol in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
                       "openblas_set_num_threads"):
            setter = getattr(lib, symbol, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                return setter
    return None


_threads = [0]


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
    setter = _numpy_blas()
    if setter is None:
        return a @ b
    if setter is not True and _threads[0] != torch.get_num_threads():  # as many threads as torch has
        _threads[0] = torch.get_num_threads()
        setter(_threads[0])  # type: ignore[operator]
    a = a if _blasable(a) else a.contiguous()
    b = b if _blasable(b) else b.contiguous()
    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


__all__ = ["THIN", "mm"]
