"""The fast spectral paths against dense float64 references (torch.linalg.svd, computed here, never by surgeon).

Covers what the speed work changed: the merged route given τ in float32 from the reader thread, the BASE +
adapter (low-rank) route on clustered and exactly repeated top singular values, the merged workflow on a tall
and a wide matrix (counts, c_j to 1e-6, σ), and the iterations' one-thread context.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgeon.ops import intruders as ops
from surgeon.ops import svd
from surgeon.ops.threads import one_cpu_thread as one_thread
from surgeon.workflows.spectral.intruders import IntruderOptions, find_intruders

K = 10


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]


def _with_spectrum(m: int, n: int, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (_orthonormal(m, s.numel(), gen) * s) @ _orthonormal(n, s.numel(), gen).T


def _reference(w0: torch.Tensor, wt: torch.Tensor, k: int = K) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(U_t top-k, σ_t top-k, c_j) from full float64 SVDs of both matrices (the authors' method)."""
    u0 = torch.linalg.svd(w0, full_matrices=False)[0]
    ut, st, _ = torch.linalg.svd(wt, full_matrices=False)
    return ut[:, :k], st[:k], [float(x) for x in (ut[:, :k].T @ u0).abs().max(dim=1).values]


def _check(trip: svd.Triplets, base: svd.BaseBasis, w0: torch.Tensor, wt: torch.Tensor) -> None:
    _, s_ref, c_ref = _reference(w0, wt)
    assert trip.residual <= svd.DEFAULT_TOL
    assert torch.allclose(trip.s, s_ref, rtol=1e-9, atol=0)
    c = ops.max_cosines(ops.base_cosines(base, w0, trip.u, "left"))[0]
    assert max(abs(a - b) for a, b in zip(c, c_ref)) < 1e-6
    assert ops.intruder_ranks(c, 0.5) == [j + 1 for j, x in enumerate(c_ref) if x < 0.5]


def _lora(m: int, n: int, r: int, gen: torch.Generator, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(m, r, generator=gen, dtype=torch.float64) * scale,
            torch.randn(r, n, generator=gen, dtype=torch.float64) / n ** 0.5)


@pytest.mark.parametrize("shape", [(300, 400), (400, 300)])
def test_merged_route_with_tau_in_float32(shape):
    """τ handed over in float32 (as the reader thread computes it) only shapes the preconditioner: exact answer."""
    gen = torch.Generator().manual_seed(11)
    m, n = shape
    w0 = (torch.randn(m, n, generator=gen, dtype=torch.float64) * 0.02).bfloat16().double()
    left, right = _lora(m, n, 8, gen, 0.03)
    wt = (w0 + left @ right).bfloat16().double()
    base = svd.base_basis(w0)
    trip = svd.top_k_merged(w0, base, wt, K, tau=(wt - w0).float())
    assert trip.method == "davidson-tau"
    _check(trip, base, w0, wt)


def test_low_rank_route_on_clustered_values():
    """BASE + LoRA with the base's top values 1e-3 apart (relative): c_j to 1e-6, counts and σ as the full SVD."""
    gen = torch.Generator().manual_seed(13)
    s = torch.cat([1.0 - 1e-3 * torch.arange(12, dtype=torch.float64), torch.linspace(0.9, 0.01, 288)])
    w0 = _with_spectrum(300, 360, s, gen)
    left, right = _lora(300, 360, 4, gen, 0.05)
    base = svd.base_basis(w0)
    trip = svd.top_k_low_rank(w0, base, left, right, K)
    _check(trip, base, w0, w0 + left @ right)


def test_low_rank_route_on_repeated_values():
    """Exactly repeated top values of W_t: σ and the top-k subspace as the full SVD (vectors in it are not unique)."""
    gen = torch.Generator().manual_seed(17)
    s = torch.cat([torch.full((6,), 2.0, dtype=torch.float64), torch.linspace(1.5, 0.01, 294)])
    w0 = _with_spectrum(300, 330, s, gen)
    left, right = _lora(300, 330, 2, gen, 1e-3)
    base = svd.base_basis(w0)
    trip = svd.top_k_low_rank(w0, base, left, right, 6)
    u_ref, s_ref, _ = _reference(w0, w0 + left @ right, 6)
    assert trip.residual <= svd.DEFAULT_TOL
    assert torch.allclose(trip.s, s_ref, rtol=1e-9, atol=0)
    assert torch.allclose(trip.u @ trip.u.T, u_ref @ u_ref.T, atol=1e-7)


def _checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    return path


def test_merged_workflow_counts_and_cosines_with_cache(tmp_path):
    """find_intruders on merged bf16 matrices (wide and tall), cold then warm cache: the same c_j to 1e-6 and counts
    as the full float64 SVDs both times, every matrix on the warm route."""
    gen = torch.Generator().manual_seed(19)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    pairs = []
    for m, n in ((420, 300), (300, 420)):
        w0 = (torch.randn(m, n, generator=gen, dtype=torch.float64) * 0.02).bfloat16()
        left, right = _lora(m, n, 8, gen, 0.03)
        pairs.append((w0, (w0.double() + left @ right).bfloat16()))
    base = _checkpoint(tmp_path / "base", {n: w0 for n, (w0, _) in zip(names, pairs)})
    tuned = _checkpoint(tmp_path / "tuned", {n: wt for n, (_, wt) in zip(names, pairs)})
    for state in ("miss", "hit"):
        report = find_intruders(tuned, base, targets="proj", cache=tmp_path / "cache", options=IntruderOptions())
        rows = {r.name: r for r in report.matrices}
        for name, (w0, wt) in zip(names, pairs):
            _, s_ref, c_ref = _reference(w0.double(), wt.double())
            row = rows[name]
            assert row.method == "davidson-tau" and row.cache == state
            assert max(abs(a - b) for a, b in zip(row.cos_left, c_ref)) < 1e-6
            assert max(abs(a - float(b)) / float(b) for a, b in zip(row.sigma, s_ref)) < 1e-9
            assert row.intruders == [j + 1 for j, x in enumerate(c_ref) if x < 0.5]


def test_one_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    with one_thread(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), one_thread(torch.device("cpu")):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before
