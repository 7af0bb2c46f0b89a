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


@pytest.mark.parametrize("shape", [(40, 700), (700, 40), (600, 600)])
def test_gram_blocks_and_the_symmetric_eigendecomposition_on_both_routes(route, shape):
    """The Gram matrix's blocks (gram_block, any column slices) and its eigendecomposition (symmetric_eigh)
    through numpy's BLAS/LAPACK equal torch's product and float64 eigh to rounding: eigenvalues to 1e-12
    of the largest, eigenvectors orthonormal and G·q = λq, also for a repeated eigenvalue."""
    from surgeon.ops import svd_gram

    gen = torch.Generator().manual_seed(shape[0])
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x = w.T if shape[0] <= shape[1] else w
    c = x.shape[1]
    for a, b in ((x, x), (x[:, 1 : c // 2], x[:, c // 3 :]), (x[:, ::3], x[:, 1::3])):
        ref = a.T.contiguous() @ b.contiguous()
        torch.testing.assert_close(blas.gram_block(a, b), ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
    g = svd_gram.gram(w)
    assert torch.equal(g, g.T)  # exactly symmetric on both routes
    q_rand = torch.linalg.qr(torch.randn(g.shape[0], g.shape[0], generator=gen, dtype=torch.float64))[0]
    lam = torch.linspace(1.0, 5.0, g.shape[0], dtype=torch.float64)
    lam[-3:] = 5.0  # a repeated top eigenvalue
    for matrix in (g, (q_rand * lam) @ q_rand.T):
        matrix = (matrix + matrix.T) / 2
        values, vectors = blas.symmetric_eigh(matrix)
        ref = torch.linalg.eigvalsh(matrix)
        scale = float(ref.abs().max())
        torch.testing.assert_close(values, ref, rtol=0, atol=1e-12 * scale)
        eye = torch.eye(matrix.shape[0], dtype=torch.float64)
        torch.testing.assert_close(vectors.T @ vectors, eye, rtol=0, atol=1e-12)
        torch.testing.assert_close(matrix @ vectors, vectors * values, rtol=0, atol=1e-11 * scale)


@pytest.mark.parametrize("shape", [(40, 700), (700, 40), (600, 600), (513, 530)])
def test_gram_of_any_layout_is_the_symmetric_product(route, shape):
    """svd_gram.gram (SYRK on W itself on numpy's route, blocks of GEMMs on torch's) of a contiguous matrix,
    a transposed view and a column slice: the float64 product to rounding, exactly symmetric."""
    from surgeon.ops import svd_gram

    gen = torch.Generator().manual_seed(sum(shape))
    m, n = shape
    for w in (torch.randn(m, n, generator=gen, dtype=torch.float64),
              torch.randn(n, m, generator=gen, dtype=torch.float64).T,
              torch.randn(m, n + 9, generator=gen, dtype=torch.float64)[:, 4:4 + n]):
        g = svd_gram.gram(w)
        ref = w @ w.T if m <= n else w.T @ w
        assert g.shape == ref.shape and torch.equal(g, g.T)
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
    if route == "1":
        w = torch.randn(m, n, generator=gen, dtype=torch.float64)
        assert torch.equal(svd_gram.gram(w), blas.self_gram(w))  # the SYRK route is the one taken


@pytest.mark.parametrize("shape", [(30, 30), (50, 20), (20, 50)])
def test_task_vector_gram_keeps_its_side(route, shape):
    """task_vector.gram is τᵀτ for m ≥ n (a square τ included) and ττᵀ otherwise, on both routes (numpy's SYRK
    route picks ττᵀ for a square matrix when left to itself)."""
    from surgeon.ops.task_vector import gram

    gen = torch.Generator().manual_seed(shape[0] + 7 * shape[1])
    tau = torch.randn(*shape, generator=gen)
    t = tau.double()
    ref = t.T @ t if shape[0] >= shape[1] else t @ t.T
    torch.testing.assert_close(gram(tau), ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


def test_symmetric_top_on_both_routes(route):
    """Every eigenvalue and the eigenvectors of the k largest (k chosen from the spectrum), largest first."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(60, 60, generator=gen, dtype=torch.float64)
    g = x @ x.T
    ref_values, ref_vectors = torch.linalg.eigh(g)
    for pick in (0, 1, 7, 60):
        values, vectors = blas.symmetric_top(g, lambda v, pick=pick: pick)
        torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-12 * float(ref_values.max()))
        assert vectors.shape == (60, pick)
        top = ref_vectors.flip(1)[:, :pick]
        torch.testing.assert_close((vectors * top).sum(0).abs(), torch.ones(pick, dtype=torch.float64), rtol=0,
                                   atol=1e-10)
