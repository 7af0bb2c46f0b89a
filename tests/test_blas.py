"""ops.blas.mm: thin products through numpy's BLAS give torch's product (to rounding), for every layout."""

from __future__ import annotations

import pytest
import torch

from surgeon.ops import blas
from surgeon.workflows.device import configure_cpu_blas, pick_device


@pytest.fixture(params=["0", "1"])
def route(request, monkeypatch):
    """torch's products ("0") or numpy's ("1"), chosen as the workflows choose (SURGEON_NUMPY_BLAS)."""
    monkeypatch.setenv("SURGEON_NUMPY_BLAS", request.param)
    configure_cpu_blas.cache_clear()
    assert configure_cpu_blas() == (request.param == "1")
    yield request.param
    monkeypatch.delenv("SURGEON_NUMPY_BLAS")
    configure_cpu_blas.cache_clear()
    blas.use_numpy_blas(None)


def _layouts(m: int, n: int, dtype: torch.dtype, gen: torch.Generator):
    """The same m × n matrix as a contiguous tensor, a transposed view, a column slice and a strided view."""
    yield "contiguous", torch.randn(m, n, generator=gen, dtype=dtype)
    yield "transposed", torch.randn(n, m, generator=gen, dtype=dtype).T
    yield "column slice", torch.randn(m, n + 7, generator=gen, dtype=dtype)[:, 3:3 + n]
    yield "every other row", torch.randn(2 * m, n, generator=gen, dtype=dtype)[::2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(300, 200, 8), (8, 300, 200), (200, 300, 64), (65, 90, 70)])
def test_mm_is_the_product(route, dtype, shape):
    m, k, n = shape
    gen = torch.Generator().manual_seed(m * 1000 + n)
    for a_name, a in _layouts(m, k, dtype, gen):
        for b_name, b in _layouts(k, n, dtype, gen):
            got = blas.mm(a, b)
            ref = a.double() @ b.double()
            assert got.shape == (m, n) and got.dtype == dtype, (a_name, b_name)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()),
                                       msg=f"{a_name} @ {b_name}")


def test_a_cpu_device_makes_the_choice(monkeypatch):
    monkeypatch.setenv("SURGEON_NUMPY_BLAS", "1")
    configure_cpu_blas.cache_clear()
    blas.use_numpy_blas(None)
    try:
        pick_device("cpu")
        assert blas.numpy_blas_in_use()
        monkeypatch.setenv("SURGEON_NUMPY_BLAS", "0")
        configure_cpu_blas.cache_clear()
        pick_device("cpu")
        assert not blas.numpy_blas_in_use()
    finally:
        configure_cpu_blas.cache_clear()
        blas.use_numpy_blas(None)


def test_other_products_are_torch_s(route):
    wide = torch.randn(100, 100, dtype=torch.float64)
    assert torch.equal(blas.mm(wide, wide), wide @ wide)  # neither side thin
    half = torch.randn(100, 4, dtype=torch.float16)
    assert torch.equal(blas.mm(half.T, half), half.T @ half)  # not a float32/float64 product
    grad = torch.randn(50, 4, dtype=torch.float64, requires_grad=True)
    assert blas.mm(wide[:, :50], grad).requires_grad  # autograd keeps torch's product
