"""Randomised SVD (extract-lora, diff's rank statistics) against dense float64 references.

The references are ``torch.linalg.svdvals`` / ``svd`` in float64 computed here; the optimal rank-k error is
Eckart–Young's √(Σ_{i>k} σ_i²) from them. The randomised route is asked for at these small sizes (``randomized_from``); by default it starts at
min(m, n) > 512 (extract-lora) / 256 (rank statistics), where it pays.
"""

from __future__ import annotations

import pytest
import torch

from surgeon.ops import rsvd
from surgeon.ops.lora_extract import factorize
from surgeon.ops.task_vector import rank_stats


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]


def _with_spectrum(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return ((_orthonormal(m, s.numel(), gen) * s) @ _orthonormal(n, s.numel(), gen).T).float()


def _merged_lora_tau(m: int, n: int, r: int = 8, seed: int = 0) -> torch.Tensor:
    """τ of a bf16-merged LoRA: rank r plus the rounding noise of bf16."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(m, n, generator=gen) * 0.02
    lora = (torch.randn(m, r, generator=gen) * 0.01) @ (torch.randn(r, n, generator=gen) / n ** 0.5) * 2
    return (w0 + lora).bfloat16().float() - w0.bfloat16().float()


def _spectra() -> dict[str, torch.Tensor]:
    n = 160
    return {
        "merged-lora-bf16": _merged_lora_tau(240, n),
        "power-law (full fine-tune)": _with_spectrum(240, n, 1.0 / torch.arange(1, n + 1, dtype=torch.float64), 1),
        "clustered": _with_spectrum(200, n, torch.cat([1 + 1e-4 * torch.arange(20, 0, -1, dtype=torch.float64),
                                                        0.05 * torch.rand(n - 20, dtype=torch.float64,
                                                                          generator=torch.Generator().manual_seed(2))]
                                                       ).sort(descending=True).values, 3),
        "repeated": _with_spectrum(n, 200, torch.cat([torch.full((12,), 3.0, dtype=torch.float64),
                                                       torch.full((n - 12,), 0.01, dtype=torch.float64)]), 4),
    }


SPECTRA = _spectra()


def _dense(tau: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(tau.double())


@pytest.mark.parametrize("case", sorted(SPECTRA))
@pytest.mark.parametrize("rank", [4, 12, 20])
def test_factors_within_one_percent_of_optimal(case, rank):
    tau = SPECTRA[case]
    s = _dense(tau)
    optimal = float((s[rank:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    f = factorize(tau, rank=rank, randomized_from=64)
    assert f.method == "randomized" and f.rank == rank
    assert f.relative_error <= 1.01 * optimal + 1e-6  # 1e-6: the float32 storage of A and B
    energy = float((s[:rank] ** 2).sum() / (s ** 2).sum())
    if float(s[rank - 1] / s[rank]) > 1.01:  # a gap at the cut: the kept energy is determined, to 1e-6
        assert f.energy == pytest.approx(energy, rel=1e-6, abs=1e-9)
    else:  # the cut inside a cluster: kept energy within what a 1% larger error allows
        assert energy - 0.0201 * (1 - energy) <= f.energy <= energy * (1 + 1e-6)  # 1e-6: float32 passes
    # measured on the written factors, independently of surgeon's report
    err = torch.linalg.vector_norm(tau.double() - f.B.double() @ f.A.double()) / torch.linalg.vector_norm(tau.double())
    assert float(err) == pytest.approx(f.relative_error, rel=1e-4)


@pytest.mark.parametrize("case", ["merged-lora-bf16", "repeated", "clustered"])
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_rank_as_dense(case, energy):
    tau = SPECTRA[case]
    s = _dense(tau)
    cum = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    want = int((cum < energy - 1e-12).sum()) + 1
    f = factorize(tau, energy=energy, randomized_from=64)
    assert f.rank == want
    assert f.energy >= energy - 1e-9


def test_singular_values_and_bound():
    tau = SPECTRA["power-law (full fine-tune)"]
    s = _dense(tau)
    p = rsvd.randomized_profile(tau, rank=10)
    assert p is not None and not p.exact
    assert float(p.s[0]) == pytest.approx(float(s[0]), rel=1e-6)  # σ₁ (diff reports it)
    assert torch.allclose(p.s[:10], s[:10], rtol=1e-3)  # lower bounds, close where the spectrum decays
    assert p.total == pytest.approx(float((s ** 2).sum()), rel=1e-12)
    assert p.bound(10) >= 1.0
    ours = (p.total - p.kept(10)) ** 0.5
    assert ours / float((s[10:] ** 2).sum().sqrt()) <= p.bound(10) * (1 + 1e-9)  # the bound holds


def test_too_wide_goes_dense():
    tau = SPECTRA["power-law (full fine-tune)"]
    assert rsvd.randomized_profile(tau, rank=100) is None
    f = factorize(tau, rank=100, randomized_from=64)
    assert f.method == "exact" and f.rank == 100


@pytest.mark.parametrize("case", sorted(SPECTRA))
def test_rank_stats_as_dense(case):
    tau = SPECTRA[case]
    s = _dense(tau)
    m, n = tau.shape
    tol = max(m, n) * torch.finfo(torch.float32).eps * float(s[0])
    cum = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    r = rank_stats(tau, randomized_from=64)
    assert r.sigma_max == pytest.approx(float(s[0]), rel=1e-6)
    assert r.stable_rank == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-6)
    assert r.rank_90 == int((cum < 0.9 - 1e-12).sum()) + 1
    assert r.rank_99 == int((cum < 0.99 - 1e-12).sum()) + 1
    true_rank = int((s > tol).sum())
    if r.numerical_rank_exact:
        assert r.numerical_rank == true_rank
    else:
        assert r.numerical_rank <= true_rank  # reported as a lower bound


def test_rank_stats_exact_numerical_rank_of_a_float32_lora():
    """A float32 rank-8 τ: the tail is below the tolerance, so the randomised count is exact."""
    gen = torch.Generator().manual_seed(9)
    tau = torch.randn(300, 8, generator=gen) @ torch.randn(8, 200, generator=gen)
    r = rank_stats(tau, randomized_from=64)
    assert r.method == "randomized" and r.numerical_rank_exact and r.numerical_rank == 8
    assert rank_stats(tau, exact=True).numerical_rank == 8
