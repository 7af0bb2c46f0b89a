"""The native thin-product kernel (ops/native_thin) against float64 products of the same (widened) values."""

from __future__ import annotations

import pytest
import torch

from surgeon.ops import blas, native_thin
from surgeon.ops.native_thin import SPLIT_FROM, thin_mm

pytestmark = pytest.mark.skipif(native_thin.kernel() is None, reason="no C compiler to build the native kernel")


def _bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The classical forward error bound of a dot-product chain: k·eps·(|a|·|b|), k the inner dimension."""
    k = a.shape[1]
    return (a.abs().double() @ b.abs().double()) * (k + 2) * torch.finfo(torch.float64).eps


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 5), (4, 4), (7, 13), (64, 300), (257, 1031)])
@pytest.mark.parametrize("width", [3, 4, 5, 8, 10, 12, 15, 16, 20, 33, 64])
@pytest.mark.parametrize("stored", [torch.float64, torch.float32, torch.bfloat16])
def test_products_match_float64(rows: int, cols: int, width: int, stored: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + cols + width)
    big = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(stored)
    exact = big.double()  # bf16/f32 values are exact in float64: the kernel widens, never rounds
    right = torch.randn(cols, width, generator=gen, dtype=torch.float64)
    left = torch.randn(width, rows, generator=gen, dtype=torch.float64)
    cases = [
        (big, right, exact, right),  # D·X, D row-major
        (big.T.contiguous().T, torch.randn(cols, width, generator=gen, dtype=torch.float64), None, None),
        (left, big, left, exact),  # a thin on the left: (Dᵀ·aᵀ)ᵀ
        (big.T, torch.randn(rows, width, generator=gen, dtype=torch.float64), None, None),  # Dᵀ·X
    ]
    for a, b, ra, rb in cases:
        ra = a.double() if ra is None else ra
        rb = b.double() if rb is None else rb
        got = thin_mm(a, b)
        assert got is not None and got.dtype == torch.float64 and got.shape == (a.shape[0], b.shape[1])
        assert got.is_contiguous()
        ref = ra @ rb
        assert bool(((got - ref).abs() <= _bound(ra, rb) + 1e-300).all())


def test_strided_rows_and_padded_block() -> None:
    """A row-major view with a row stride wider than its columns, and a non-contiguous thin side."""
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(50, 90, generator=gen, dtype=torch.float64)
    view = wide[:, 7:70]  # stride 90, 63 columns
    x = torch.randn(10, 63, generator=gen, dtype=torch.float64).T  # (63 x 10), column-major
    got = thin_mm(view, x)
    assert got is not None
    ref = view @ x
    assert bool(((got - ref).abs() <= _bound(view, x)).all())
    assert thin_mm(wide[::2, ::2], x[:45]) is None  # neither rows nor columns contiguous: the caller multiplies


def test_same_bits_for_any_split() -> None:
    """Sharing the output rows between threads does not change a bit (one chain per element)."""
    gen = torch.Generator().manual_seed(2)
    d = torch.randn(2100, 2100, generator=gen, dtype=torch.float64)
    assert d.numel() >= SPLIT_FROM
    x = torch.randn(2100, 11, generator=gen, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (thin_mm(d, x), thin_mm(d.T, x), thin_mm(x.T, d))
        torch.set_num_threads(2)
        two = (thin_mm(d, x), thin_mm(d.T, x), thin_mm(x.T, d))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert a is not None and b is not None and torch.equal(a, b)


def test_not_taken() -> None:
    """Shapes and types the kernel does not do come back as None (mm then multiplies as before)."""
    a = torch.randn(100, 100, dtype=torch.float64)
    assert thin_mm(a, torch.randn(100, 65, dtype=torch.float64)) is None  # neither side thin
    assert thin_mm(a.float(), torch.randn(100, 8)) is None  # float32 thin side
    assert thin_mm(a, torch.randn(100, 8, dtype=torch.float64, requires_grad=True)) is None
    assert thin_mm(a[:, :0], torch.randn(0, 8, dtype=torch.float64)) is None


def test_mm_routes_through_the_kernel_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(300, 200, generator=gen, dtype=torch.float64)
    b = torch.randn(200, 9, generator=gen, dtype=torch.float64)
    assert torch.equal(blas.mm(a, b), thin_mm(a, b))
    monkeypatch.setenv("SURGEON_NATIVE", "0")
    assert native_thin.kernel() is None and thin_mm(a, b) is None
    off = blas.mm(a, b)  # the BLAS's product: the same numbers to rounding
    assert bool(((off - a @ b).abs() <= _bound(a, b)).all())


@pytest.mark.parametrize("width", [1, 2, 3, 5, 7, 13, 19, 30])
@pytest.mark.parametrize("stored", [torch.float64, torch.bfloat16])
def test_partial_vectors_give_the_padded_bits(monkeypatch, width: int, stored: torch.dtype) -> None:
    """The last 1-3 columns in partial vectors (small D) and a zero-padded block (big D) are the same chains:
    the same bits either way, for D·X, Dᵀ·X and a thin left side."""
    gen = torch.Generator().manual_seed(width)
    d = torch.randn(37, 301, generator=gen, dtype=torch.float64).to(stored)
    cases = [(d, torch.randn(301, width, generator=gen, dtype=torch.float64)),
             (d.T, torch.randn(37, width, generator=gen, dtype=torch.float64)),
             (torch.randn(width, 37, generator=gen, dtype=torch.float64), d)]
    for a, b in cases:
        monkeypatch.setattr(native_thin, "PAD_FROM", 1 << 40)  # never pad
        tail = thin_mm(a, b)
        monkeypatch.setattr(native_thin, "PAD_FROM", 0)  # always pad
        padded = thin_mm(a, b)
        assert tail is not None and padded is not None and tail.is_contiguous()
        assert torch.equal(tail, padded)
        torch.testing.assert_close(tail, a.double() @ b.double(), rtol=1e-12, atol=1e-12)
