"""Which LoRA products the native kernel reproduces bit for bit: a rule measured against torch's CPU BLAS.

The kernel (``native/merge_rows.c``) computes every element of B·A as one fused multiply-add chain over
the rank, from +0. torch's float32 matmul on the CPU (MKL) does the same for the GEMMs of a LoRA delta,
except in two measured cases, where it takes another kernel and another order of additions:

- a product with one row or one column (out or in features = 1, e.g. a ``Linear(20, 1)`` head or a
  one-channel GPT-2 ``Conv1D``): MKL computes it as a matrix-vector product (gemv), whose partial sums
  differ from the chain by up to a few ulps (ranks >= 2);
- a rank above 384: MKL's AVX-512 sgemm splits the inner dimension into blocks of 384 and adds the
  blocks' partial sums, which the single chain does not do.

Measured with torch 2.13 / MKL 2024.2 on AVX-512 (1, 2 and 8 threads): over every (out, in, rank) of
out, in in {1, 2, 3, 4, 5, 7, 8, 10, 16, 20, 32, 33, 64, 100, 128, 256} x {1, 2, 3, 5, 10, 16, 20, 31,
64, 100, 130, 256}, ranks {1, ..., 128}, both layouts, every difference had out = 1 or in = 1; ranks 385,
386, ..., 2048 differ, 1 ... 384 agree. Those shapes take the torch path, which is peft's arithmetic by
construction; ``tests/test_native_small_shapes.py`` re-measures the rule wherever the tests run.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_EXACT_RANK = 384  # MKL's inner-dimension block on AVX-512; above it the partial sums are added


def native_exact(out_features: int, in_features: int, ranks: Iterable[int]) -> bool:
    """Whether the kernel gives torch's bits for the LoRA deltas of a (out × in) module of these ranks:
    a GEMM that MKL does not compute as a matrix-vector product, with every rank at most MAX_EXACT_RANK."""
    if out_features < 2 or in_features < 2:
        return False
    return all(1 <= r <= MAX_EXACT_RANK for r in ranks)
