"""ops.lapack: the split symmetric eigendecomposition (dsytrd, dstedc, surgeon's back-transformation) against
numpy's dsyevd and against the reflectors multiplied out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgeon.ops import lapack

pytestmark = pytest.mark.skipif(not lapack.available(), reason="numpy's wheel carries no OpenBLAS with LAPACKE here")


def _symmetric(n: int, seed: int, spectrum: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if spectrum is None:
        x = rng.standard_normal((n, n))
        return x + x.T
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    g = (q * spectrum) @ q.T
    return (g + g.T) / 2


def _check(g: np.ndarray, block: int = lapack.BLOCK) -> None:
    before = g.copy()
    values, vectors = lapack.eigh(g, block=block)  # type: ignore[misc]
    assert np.array_equal(g, before)  # the input is not overwritten
    ref = np.linalg.eigvalsh(g)
    scale = max(float(np.abs(ref).max()), 1e-300)
    n = g.shape[0]
    assert values.shape == (n,) and vectors.shape == (n, n)
    assert np.all(np.diff(values) >= 0)  # ascending, as numpy's
    np.testing.assert_allclose(values, ref, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(n), rtol=0, atol=1e-12)
    np.testing.assert_allclose(g @ vectors, vectors * values, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 300])
@pytest.mark.parametrize("block", [1, 7, 64, lapack.BLOCK])
def test_random_symmetric_matrices(n, block):
    _check(_symmetric(n, n * 31 + block), block)


def test_repeated_and_clustered_eigenvalues():
    n = 200
    lam = np.linspace(1.0, 2.0, n)
    lam[-5:] = 2.0  # a repeated top eigenvalue
    lam[50:60] = 1.25 + 1e-13 * np.arange(10)  # a cluster within rounding
    lam[:20] = 0.0  # a null space, as a rank-deficient Gram matrix has
    _check(_symmetric(n, 3, lam), block=32)


def test_matrices_that_need_no_reduction():
    """Diagonal and tridiagonal input: dsytrd's reflectors are the identity (τ = 0) and must stay so."""
    rng = np.random.default_rng(5)
    d = rng.standard_normal(90)
    _check(np.diag(d), block=16)
    e = rng.standard_normal(89)
    _check(np.diag(d) + np.diag(e, 1) + np.diag(e, -1), block=16)


def test_a_gram_matrix_of_a_bf16_like_weight():
    """What the base basis decomposes: WᵀW of a 400 x 160 matrix, values spread over six decades."""
    rng = np.random.default_rng(9)
    u = np.linalg.qr(rng.standard_normal((400, 160)))[0]
    v = np.linalg.qr(rng.standard_normal((160, 160)))[0]
    w = (u * np.logspace(0, -6, 160)) @ v.T
    _check(w.T @ w, block=48)


@pytest.mark.parametrize("block", [1, 3, 8])
def test_apply_reflectors_is_the_product_of_the_reflectors(block):
    """H·C by blocks equals H(1)···H(N−1)·C multiplied out one reflector at a time from dsytrd's output."""
    n = 23
    g = _symmetric(n, 11)
    sytrd = lapack._symbols().sytrd  # type: ignore[union-attr]
    a = np.array(g, order="F")
    d, e, tau = np.empty(n), np.empty(n - 1), np.empty(n - 1)
    assert sytrd(102, b"L", n, a.ctypes.data, n, d.ctypes.data, e.ctypes.data, tau.ctypes.data) == 0
    h = np.eye(n)
    for i in range(n - 1):
        vec = np.zeros(n)
        vec[i + 1] = 1.0
        vec[i + 2:] = a[i + 2:, i]
        h = h @ (np.eye(n) - tau[i] * np.outer(vec, vec))
    t = np.diag(d) + np.diag(e, 1) + np.diag(e, -1)
    np.testing.assert_allclose(h @ t @ h.T, g, atol=1e-12 * float(np.abs(g).max()))  # the reflectors read right
    c = np.random.default_rng(2).standard_normal((n, 6))
    ct = np.ascontiguousarray(c.T)
    lapack.apply_reflectors(a, tau, ct, block=block)
    np.testing.assert_allclose(ct.T, h @ c, rtol=0, atol=1e-13)


def test_apply_reflectors_refuses_a_strided_target():
    a = np.asfortranarray(_symmetric(6, 1))
    with pytest.raises(ValueError, match="C-contiguous"):
        lapack.apply_reflectors(a, np.zeros(5), np.zeros((3, 12))[:, ::2], block=2)


def test_symmetric_eigh_takes_the_split_route(monkeypatch):
    """With numpy's BLAS in use, blas.symmetric_eigh is lapack.eigh (same bits), and the base basis from it
    agrees with torch's float64 eigh."""
    from surgeon.ops import blas
    from surgeon.workflows.device import configure_cpu_blas

    monkeypatch.setenv("SURGEON_NUMPY_BLAS", "1")
    configure_cpu_blas.cache_clear()
    try:
        assert configure_cpu_blas()
        g = torch.from_numpy(_symmetric(150, 8))
        values, vectors = blas.symmetric_eigh(g)
        mine = lapack.eigh(g.numpy())
        assert mine is not None and torch.equal(values, torch.from_numpy(mine[0]))
        assert torch.equal(vectors, torch.from_numpy(mine[1]))
        ref = torch.linalg.eigvalsh(g)
        torch.testing.assert_close(values, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    finally:
        configure_cpu_blas.cache_clear()
        blas.use_numpy_blas(None)


def test_eigh_top_chooses_k_from_the_spectrum():
    g = _symmetric(120, 21, np.linspace(0.0, 3.0, 120))
    seen = []
    values, vectors = lapack.eigh_top(g, lambda v: seen.append(v.copy()) or 5)  # type: ignore[misc]
    np.testing.assert_allclose(seen[0], np.linalg.eigvalsh(g), rtol=0, atol=1e-12 * 3.0)
    assert vectors.shape == (120, 5)
    np.testing.assert_allclose(g @ vectors, vectors * values[-5:], rtol=0, atol=1e-12 * 3.0)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(5), rtol=0, atol=1e-12)
    assert lapack.eigh_top(g, 0)[1].shape == (120, 0)  # type: ignore[index]
    with pytest.raises(ValueError, match="k = 121"):
        lapack.eigh_top(g, 121)
