"""Thin float64 products on the CPU through a small native kernel (``native/thin_mm.c``), loaded with ctypes.

A big matrix times a block of at most :data:`THIN` vectors, the products the spectral iterations live on:
a general GEMM (MKL or OpenBLAS) packs the big operand at every call and runs these at 40% of the
processor's peak (one thread of the benchmarks' AMD EPYC, 5632 x 2048 times 10 vectors in float64:
OpenBLAS 22 ms, this kernel 9.9 ms; see the C source for how). Built at first use
with the system C compiler, as :mod:`surgeon.ops.native_merge` builds its kernel (same trusted places);
with no compiler, a failed build or ``SURGEON_NATIVE=0`` :func:`thin_mm` answers None and the caller
multiplies as before.

Results are float64 products summed in one fixed order per element (the big matrix's columns for
``D·X``, its rows for ``Dᵀ·X``): the same bits in every process on a machine and for every split of the
output between threads.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from surgeon.ops.native_merge import load_library, once_per_process

SOURCE = Path(__file__).with_name("native") / "thin_mm.c"
THIN = 64  # the narrow side, in columns
PAD_FROM = 1 << 17  # D elements from which a block whose width is not a multiple of 4 is padded
SPLIT_FROM = 1 << 22  # elements of the big matrix from which a call is shared between threads
_CODES = {torch.float64: 3, torch.float32: 0, torch.bfloat16: 2}  # how the big matrix may be stored
_pool: list[ThreadPoolExecutor] = []
_pool_lock = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child has none of the pool's threads: it starts its own
    os.register_at_fork(after_in_child=_pool.clear)


def _load() -> ctypes.CDLL | None:
    lib = load_library(SOURCE, ("-ffp-contract=fast",))
    if lib is None:
        return None
    for name in ("thin_rows", "thin_cols"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t,
                       ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return lib


kernel = once_per_process(_load)  # the kernel, built on first use and loaded once; None where it cannot be


def _row_major(x: torch.Tensor) -> bool:
    return x.stride(1) == 1 and x.stride(0) >= max(x.shape[1], 1)


def _big_matrix(x: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """(D row-major, transposed) with x = D or x = Dᵀ, without a copy; None when neither is a row-major view."""
    if _row_major(x):
        return x, False
    if _row_major(x.T):
        return x.T, True
    return None


def thin_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``a @ b`` in float64 for 2-D CPU tensors when one side is at most THIN wide and float64, the other
    float64, float32 or bfloat16 (widened exactly), and the kernel is there; None otherwise (the caller
    multiplies)."""
    if (a.device.type != "cpu" or b.device.type != "cpu" or a.dim() != 2 or b.dim() != 2 or a.requires_grad
            or b.requires_grad or 0 in a.shape or 0 in b.shape):
        return None
    if b.shape[1] <= THIN and b.dtype == torch.float64 and a.dtype in _CODES:
        big, small, flip = a, b, False  # a @ b
    elif a.shape[0] <= THIN and a.dtype == torch.float64 and b.dtype in _CODES:
        big, small, flip = b.T, a.T, True  # (bᵀ @ aᵀ)ᵀ
    else:
        return None
    found = _big_matrix(big)
    lib = kernel() if found is not None else None
    if lib is None:
        return None
    d, transposed = found  # big = d (thin_rows) or dᵀ (thin_cols)
    w = small.shape[1]
    # the kernel takes any width (the last 1-3 columns in partial vectors, lane for lane what zero padding
    # gives), but over a big D those run ~1.5x slower than a padded whole vector: pad there, where the copy is
    # cheap beside the product; small products (the preconditioner's) skip the copies
    wp = -(-w // 4) * 4 if d.numel() >= PAD_FROM else w
    if wp == w:
        x = small.contiguous()
    else:
        x = torch.empty(small.shape[0], wp, dtype=torch.float64)
        x[:, :w] = small
        x[:, w:] = 0.0
    y = torch.empty(big.shape[0], wp, dtype=torch.float64)
    _run(lib, d, transposed, x, y)
    y = y if wp == w else y[:, :w]
    return (y.T if flip else y).contiguous()


def _run(lib: ctypes.CDLL, d: torch.Tensor, transposed: bool, x: torch.Tensor, y: torch.Tensor) -> None:
    """Y = D·X (thin_rows) or Dᵀ·X (thin_cols); shared by output rows between torch's threads when D is big."""
    rows, cols = d.shape
    ld, size, wp = d.stride(0), d.element_size(), x.shape[1]
    code = _CODES[d.dtype]
    fn = lib.thin_cols if transposed else lib.thin_rows
    out = cols if transposed else rows
    parts = min(torch.get_num_threads(), max(1, out // 64)) if rows * cols >= SPLIT_FROM else 1
    if parts <= 1:
        _check(fn(d.data_ptr(), code, rows, cols, ld, x.data_ptr(), wp, y.data_ptr()))
        return
    step = -(-out // (4 * parts)) * 4  # whole groups of 4 (the kernel's rows at a time): the same chains as one call

    def one(start: int) -> None:
        n = min(step, out - start)
        yp = y.data_ptr() + start * wp * 8
        if transposed:  # columns [start, start + n) of D: their rows of Y
            _check(fn(d.data_ptr() + start * size, code, rows, n, ld, x.data_ptr(), wp, yp))
        else:  # rows [start, start + n) of D
            _check(fn(d.data_ptr() + start * ld * size, code, n, cols, ld, x.data_ptr(), wp, yp))

    starts = list(range(0, out, step))
    futures = [_executor().submit(one, s) for s in starts[1:]]
    one(starts[0])
    for f in futures:
        f.result()


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("the thin-product kernel could not allocate its 4-row buffer")


def _executor() -> ThreadPoolExecutor:
    with _pool_lock:
        if not _pool:
            _pool.append(ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="surgeon-thin"))
        return _pool[0]


__all__ = ["THIN", "kernel", "thin_mm"]
