"""The native kernels of `surgeon apply`'s magnitude methods (``native/gta_rows.c``), loaded with ctypes.

Built at first use with the system C compiler into the user's cache, as :mod:`surgeon.ops.native_merge`
builds its kernel (same flags, same trusted places). With no compiler, a failed build or ``SURGEON_NATIVE=0``
:func:`kernel` returns None and the callers take their torch paths, which give the same kept sets and
the same bits.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy

from surgeon.ops.native_merge import DTYPE_CODES, load_library, once_per_process

SOURCE = Path(__file__).with_name("native") / "gta_rows.c"
MAX_INPUTS = 64  # the kernel's per-element scratch
_P = ctypes.c_void_p


def _load() -> ctypes.CDLL | None:
    lib = load_library(SOURCE)
    if lib is None:
        return None
    lib.tau_abs.restype = ctypes.c_int
    lib.tau_abs.argtypes = [_P, ctypes.c_int, _P, ctypes.c_int, ctypes.c_size_t, _P, ctypes.POINTER(ctypes.c_double)]
    lib.tau_abs_pairs.restype = ctypes.c_int
    lib.tau_abs_pairs.argtypes = [_P, ctypes.c_int, _P, ctypes.c_int, ctypes.c_size_t, ctypes.c_int64, _P,
                                  ctypes.POINTER(ctypes.c_double)]
    lib.fill_pairs.restype = None
    lib.fill_pairs.argtypes = [_P, ctypes.c_int64, _P]
    lib.sorted_range.restype = ctypes.c_int
    lib.sorted_range.argtypes = [_P, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, _P,
                                 ctypes.POINTER(ctypes.c_double)]
    lib.gta_block.restype = None
    lib.gta_block.argtypes = [ctypes.c_size_t, _P, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, ctypes.c_int64, _P,
                              _P, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float, _P, ctypes.c_int]
    return lib


kernel = once_per_process(_load)  # the kernels, built on first use and loaded once; None where they cannot be


def _ptr(array: numpy.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


def tau_abs(lib: ctypes.CDLL, a: numpy.ndarray, a_dtype: str, b: numpy.ndarray | None, b_dtype: str,
            out: numpy.ndarray, *, l1: bool = True) -> tuple[bool, float]:
    """out = |a − b| (|a| without ``b``) as float32 from raw stored elements; (any non-zero, Σ out in float64,
    0 unless ``l1``)."""
    total = ctypes.c_double()
    nonzero = lib.tau_abs(_ptr(a), DTYPE_CODES[a_dtype], _ptr(b), DTYPE_CODES.get(b_dtype, 0), out.size,
                          _ptr(out), ctypes.byref(total) if l1 else None)
    return bool(nonzero), total.value


def tau_abs_pairs(lib: ctypes.CDLL, a: numpy.ndarray, a_dtype: str, b: numpy.ndarray | None, b_dtype: str,
                  pairs: numpy.ndarray, start: int, *, l1: bool = True) -> tuple[bool, float]:
    """pairs[i] = (|a − b| or |a| as float32, start + i), ``pairs`` uint64 (see :func:`pairs_buffer`); (any
    non-zero, Σ|.| in float64, 0 unless ``l1``)."""
    total = ctypes.c_double()
    nonzero = lib.tau_abs_pairs(_ptr(a), DTYPE_CODES[a_dtype], _ptr(b), DTYPE_CODES.get(b_dtype, 0), pairs.size,
                                start, _ptr(pairs), ctypes.byref(total) if l1 else None)
    return bool(nonzero), total.value


def pairs_buffer(numel: int) -> numpy.ndarray:
    """Room for ``numel`` (float32 value, int32 index) pairs."""
    return numpy.empty(numel, dtype=numpy.uint64)


def sorted_range_pairs(lib: ctypes.CDLL, pairs: numpy.ndarray, *, descending: bool, lo: int, hi: int,
                       bits: numpy.ndarray) -> float | None:
    """Bit i of ``bits`` (uint8, little-endian bit order, zeroed, at least (n + 7) // 8) set where torch's CPU
    sort of the pairs' values puts element i (the pair's index) at a position in [lo, hi); ``pairs`` are
    permuted in place. The kept values' sum, or None where the sort would have taken its heapsort fallback
    (then ``bits`` are incomplete and the caller sorts)."""
    if pairs.size >= 2**31:
        return None
    kept = ctypes.c_double()
    rc = lib.sorted_range(_ptr(pairs), pairs.size, int(descending), lo, hi, _ptr(bits), ctypes.byref(kept))
    return None if rc else kept.value


def sorted_range(lib: ctypes.CDLL, values: numpy.ndarray, *, descending: bool, lo: int, hi: int,
                 mask: numpy.ndarray) -> float | None:
    """:func:`sorted_range_pairs` for float32 ``values`` (left unchanged), ``mask`` one uint8 0/1 per value."""
    pairs = pairs_buffer(values.size)
    lib.fill_pairs(_ptr(numpy.ascontiguousarray(values, dtype=numpy.float32)), values.size, _ptr(pairs))
    bits = numpy.zeros((values.size + 7) // 8, dtype=numpy.uint8)
    total = sorted_range_pairs(lib, pairs, descending=descending, lo=lo, hi=hi, bits=bits)
    mask[:] = numpy.unpackbits(bits, bitorder="little")[: values.size]
    return total


def gta_block(lib: ctypes.CDLL, base: numpy.ndarray, base_dtype: str, inputs: list[tuple[numpy.ndarray, str, bool]],
              masks: list[numpy.ndarray | None], start: int, scales: list[float], weights: list[float], *,
              consensus: int, normalize: bool, divisor: float, lambda_scale: float, out: numpy.ndarray,
              out_dtype: str) -> None:
    """One block of θ_base + λ·mix(w_i·s_i·(m_i·τ_i)) into ``out`` (raw elements of ``out_dtype``); ``inputs``:
    (raw elements, dtype, is a fine-tune); ``masks``: whole-tensor keep bits (little-endian), this block's
    first element being bit ``start``; consensus 0 none, 1 sum, 2 count (see gta_rows.c)."""
    count = len(inputs)
    pointers = (ctypes.c_void_p * count)(*(_ptr(a) for a, _, _ in inputs))
    dtypes = (ctypes.c_int * count)(*(DTYPE_CODES[d] for _, d, _ in inputs))
    finetune = (ctypes.c_int * count)(*(int(f) for _, _, f in inputs))
    mask_ptrs = (ctypes.c_void_p * count)(*(_ptr(m) for m in masks))
    scale_arr = (ctypes.c_float * count)(*scales)
    weight_arr = (ctypes.c_float * count)(*weights)
    lib.gta_block(base.size, _ptr(base), DTYPE_CODES[base_dtype], count, pointers, dtypes, finetune, mask_ptrs,
                  start, scale_arr, weight_arr, consensus, int(normalize), divisor, lambda_scale, _ptr(out),
                  DTYPE_CODES[out_dtype])
