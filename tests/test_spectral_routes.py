"""The warm route for merged checkpoints (Davidson from the base + τ's randomised range) against full float64 SVDs.

References are ``torch.linalg.svd`` of W₀ and W_t in float64 (the authors' method, computed here, never by
surgeon); the matrices are above the size where surgeon would take its dense route, so the iteration runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from surgeon.cli.main import cli
from surgeon.ops import intruders as ops
from surgeon.ops import svd
from surgeon.workflows.spectral.intruders import IntruderOptions, find_intruders

K = 10


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]


def _with_spectrum(m: int, n: int, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (_orthonormal(m, s.numel(), gen) * s) @ _orthonormal(n, s.numel(), gen).T


def _merged_lora(m: int, n: int, *, r: int = 8, seed: int = 0, bf16: bool = True, scale: float = 0.03
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W₀, W_t): a Gaussian base and base + a rank-r LoRA, stored (rounded) in bf16 like a merged download."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64) * 0.02
    lora = (torch.randn(m, r, generator=gen, dtype=torch.float64) * scale) @ (
        torch.randn(r, n, generator=gen, dtype=torch.float64) / n ** 0.5)
    wt = w0 + lora
    if bf16:
        w0, wt = w0.bfloat16().double(), wt.bfloat16().double()
    return w0, wt


def _reference(w0: torch.Tensor, wt: torch.Tensor, k: int = K) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    u0 = torch.linalg.svd(w0, full_matrices=False)[0]
    ut, st, _ = torch.linalg.svd(wt, full_matrices=False)
    c = (ut[:, :k].T @ u0).abs().max(dim=1).values
    return ut[:, :k], st[:k], [float(x) for x in c]


@pytest.mark.parametrize("shape", [(300, 420), (420, 300)])
@pytest.mark.parametrize("bf16", [True, False])
def test_merged_route_matches_full_svd(shape, bf16):
    w0, wt = _merged_lora(*shape, bf16=bf16)
    base = svd.base_basis(w0)
    trip = svd.top_k_merged(w0, base, wt, K)
    assert trip.method == "davidson-tau"  # the warm route itself, not its fallback
    assert trip.residual <= svd.DEFAULT_TOL
    u_ref, s_ref, c_ref = _reference(w0, wt)
    assert torch.allclose(trip.s, s_ref, rtol=1e-9, atol=0)
    c = ops.max_cosines(ops.base_cosines(base, w0, trip.u, "left"))[0]
    assert max(abs(a - b) for a, b in zip(c, c_ref)) < 1e-6
    assert ops.intruder_ranks(c, 0.5) == [j + 1 for j, x in enumerate(c_ref) if x < 0.5]


def test_merged_route_on_a_full_fine_tune():
    """τ small and of full rank (no low-rank structure): still exact (the route may fall back, never be wrong)."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(320, 320, generator=gen, dtype=torch.float64) * 0.02
    wt = w0 + torch.randn(320, 320, generator=gen, dtype=torch.float64) * 2e-4
    trip = svd.top_k_merged(w0, svd.base_basis(w0), wt, K)
    _, s_ref, c_ref = _reference(w0, wt)
    assert trip.residual <= svd.DEFAULT_TOL
    assert torch.allclose(trip.s, s_ref, rtol=1e-9, atol=0)
    c = ops.max_cosines(ops.base_cosines(svd.base_basis(w0), w0, trip.u, "left"))[0]
    assert max(abs(a - b) for a, b in zip(c, c_ref)) < 1e-6


def test_clustered_singular_values():
    """Top singular values 1e-3 apart (relative): vectors still determined, c_j to 1e-6."""
    gen = torch.Generator().manual_seed(5)
    s = torch.cat([1.0 - 1e-3 * torch.arange(12, dtype=torch.float64), torch.linspace(0.9, 0.01, 288)])
    w0 = _with_spectrum(300, 360, s, gen)
    lora = (torch.randn(300, 4, generator=gen, dtype=torch.float64) * 0.05) @ (
        torch.randn(4, 360, generator=gen, dtype=torch.float64) / 19)
    wt = (w0 + lora).bfloat16().double()
    w0b = w0.bfloat16().double()
    base = svd.base_basis(w0b)
    trip = svd.top_k_merged(w0b, base, wt, K)
    _, s_ref, c_ref = _reference(w0b, wt)
    assert trip.residual <= svd.DEFAULT_TOL
    assert torch.allclose(trip.s, s_ref, rtol=1e-9, atol=0)
    c = ops.max_cosines(ops.base_cosines(base, w0b, trip.u, "left"))[0]
    assert max(abs(a - b) for a, b in zip(c, c_ref)) < 1e-6


def test_repeated_singular_values():
    """Exactly repeated top values (W_t = W₀ + a rank-r change orthogonal to W₀'s top space): the singular values and
    the top-k subspace agree with the full SVD (the vectors inside a repeated value are not unique, their span is)."""
    gen = torch.Generator().manual_seed(7)
    s = torch.cat([torch.full((6,), 2.0, dtype=torch.float64), torch.linspace(1.5, 0.01, 294)])
    w0 = _with_spectrum(300, 330, s, gen)
    wt = w0.clone()
    wt += 1e-3 * _with_spectrum(300, 330, torch.ones(2, dtype=torch.float64), gen)
    base = svd.base_basis(w0)
    trip = svd.top_k_merged(w0, base, wt, 6)
    u_ref, s_ref, _ = _reference(w0, wt, 6)
    assert trip.residual <= svd.DEFAULT_TOL
    assert torch.allclose(trip.s, s_ref, rtol=1e-9, atol=0)
    assert torch.allclose(trip.u @ trip.u.T, u_ref @ u_ref.T, atol=1e-7)


def test_low_rank_operator_solve_is_the_inverse():
    """The Woodbury preconditioner against a dense solve of (Σ₀² + D − θI)."""
    w0, _ = _merged_lora(60, 80, bf16=False)
    gen = torch.Generator().manual_seed(1)
    left, right = torch.randn(60, 3, generator=gen, dtype=torch.float64), torch.randn(3, 80, generator=gen,
                                                                                        dtype=torch.float64)
    base = svd.base_basis(w0)
    from surgeon.ops.svd_davidson import LowRankOperator

    op = LowRankOperator.build(w0, base.basis, base.s, left, right)
    dense = base.basis.T @ (w0 + left @ right) @ (w0 + left @ right).T @ base.basis
    x = torch.randn(60, 2, generator=gen, dtype=torch.float64)
    assert torch.allclose(op(x), dense @ x, rtol=1e-10, atol=1e-12)
    theta = 0.3 * float(dense.diagonal().max())
    want = torch.linalg.solve(dense - theta * torch.eye(60, dtype=torch.float64), x)
    got = op.solve(torch.tensor([theta, theta], dtype=torch.float64), x.T[:, :, None])[:, :, 0].T
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-10)


def _checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    return path


def test_workflow_reports_the_route_and_matches_the_reference(tmp_path):
    """find_intruders on a merged bf16 checkpoint: counts and c_j as the full SVDs, the route in --json."""
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    pairs = [_merged_lora(420, 300, seed=1), _merged_lora(300, 300, seed=2)]
    base = _checkpoint(tmp_path / "base", {n: w0.bfloat16() for n, (w0, _) in zip(names, pairs)})
    tuned = _checkpoint(tmp_path / "tuned", {n: wt.bfloat16() for n, (_, wt) in zip(names, pairs)})
    report = find_intruders(tuned, base, targets="proj", use_cache=False, options=IntruderOptions())
    rows = {r.name: r for r in report.matrices}
    for name, (w0, wt) in zip(names, pairs):
        _, _, c_ref = _reference(w0, wt)
        row = rows[name]
        assert row.method == "davidson-tau"
        assert max(abs(a - b) for a, b in zip(row.cos_left, c_ref)) < 1e-6
        assert row.intruders == [j + 1 for j, x in enumerate(c_ref) if x < 0.5]
    result = CliRunner().invoke(cli, ["intruders", str(tuned), "--base", str(base), "--targets", "proj", "--no-cache",
                                      "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    body = body.get("result", body)
    assert {m["method"] for m in body["matrices"]} == {"davidson-tau"}
    assert body["methods"] == {"davidson-tau": 2}


def test_estimate_cost_orders_the_work():
    """Costs known before any decomposition: bigger matrices cost more, a cached base less, the warm routes less."""
    big, small = (5632, 2048), (256, 2048)
    assert svd.estimate_cost(big, 10, route="merged") > svd.estimate_cost(small, 10, route="merged")
    assert svd.estimate_cost(big, 10, route="merged", cached=True) < svd.estimate_cost(big, 10, route="merged")
    assert svd.estimate_cost(big, 10, route="merged", cached=True) < svd.estimate_cost(big, 10, route="krylov",
                                                                                          cached=True)
    assert svd.estimate_cost(big, 10, route="lowrank", cached=True) < svd.estimate_cost(big, 10, route="dense",
                                                                                           cached=True)


def test_planned_cost_per_matrix(tmp_path):
    """Every planned matrix has a cost before anything is decomposed; the adapter route is priced as low-rank."""
    from surgeon.workflows.spectral.intruders import open_inputs, planned_cost
    from surgeon.workflows.spectral.spectrum import resolve_targets

    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    pairs = [_merged_lora(420, 300, seed=1), _merged_lora(300, 300, seed=2)]
    base = _checkpoint(tmp_path / "base", {n: w0.bfloat16() for n, (w0, _) in zip(names, pairs)})
    tuned = _checkpoint(tmp_path / "tuned", {n: wt.bfloat16() for n, (_, wt) in zip(names, pairs)})
    with open_inputs(tuned, base, None) as inputs:
        chosen = resolve_targets(inputs.base, "proj", what=str(base))
        costs = {t.name: planned_cost(inputs, t, IntruderOptions()) for t in chosen}
    assert set(costs) == set(names) and all(c > 0 for c in costs.values())
    assert costs[names[0]] == svd.estimate_cost((420, 300), K, route="merged")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_reader_s_tau_is_the_difference_rounded_once(tmp_path, dtype):
    """The reader thread's τ (float32, for the range finder) equals W_t − W₀ in float64 rounded to float32,
    W₀ and W_t are the stored values in float64, and a non-finite W_t leaves τ and the check to the main
    thread (which refuses it, naming the tensor)."""
    from surgeon.errors import SurgeonError
    from surgeon.io.svd_cache import SvdCache
    from surgeon.workflows.spectral.intruders import materialize, open_inputs, read_target
    from surgeon.workflows.spectral.spectrum import resolve_targets

    w0, wt = _merged_lora(96, 80, seed=3, bf16=False)
    name = "model.layers.0.mlp.up_proj.weight"
    base = _checkpoint(tmp_path / "base", {name: w0.to(dtype)})
    tuned = _checkpoint(tmp_path / "tuned", {name: wt.to(dtype)})
    with open_inputs(tuned, base, None) as inputs:
        (target,) = resolve_targets(inputs.base, "proj", what=str(base))
        loaded = read_target(inputs, target, SvdCache(None))
    want0, want_t = w0.to(dtype).double(), wt.to(dtype).double()
    assert torch.equal(loaded.w0, want0) and torch.equal(loaded.tuned, want_t) and loaded.finite
    assert loaded.tau is not None and torch.equal(loaded.tau, (want_t - want0).float())
    broken = wt.to(dtype).clone()
    broken[5, 7] = float("inf")
    bad = _checkpoint(tmp_path / "bad", {name: broken})
    with open_inputs(bad, base, None) as inputs:
        (target,) = resolve_targets(inputs.base, "proj", what=str(base))
        loaded = read_target(inputs, target, SvdCache(None))
        assert not loaded.finite and loaded.tau is None
        with pytest.raises(SurgeonError, match="up_proj"):
            materialize(inputs, loaded)
