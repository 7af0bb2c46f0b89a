"""Spectral building blocks and `surgeon spectrum`, against full float64 ``torch.linalg.svd``."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from _spectral_helpers import geometric_matrix, save_matrices
from surgeon.cli.main import cli
from surgeon.io.svd_cache import SvdCache, content_key
from surgeon.ops import svd
from surgeon.ops.targets import Target, compile_targets, layer_and_module, select_targets
from surgeon.workflows.spectral.spectrum import effective_rank, spectrum

SHAPES = [(120, 120), (200, 90), (90, 200)]


def _random(m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / math.sqrt(n)


def _assert_triplets_match(t: svd.Triplets, w: torch.Tensor, k: int) -> None:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(t.s, s[:k], rtol=1e-10, atol=1e-12)
    # singular vectors agree up to sign
    assert (1 - (t.u.T @ u[:, :k]).diagonal().abs()).abs().max() < 1e-8
    assert (1 - (t.v.T @ vh[:k].T).diagonal().abs()).abs().max() < 1e-8
    assert t.residual <= svd.DEFAULT_TOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["krylov", "dense", "auto"])
def test_top_k_equals_full_svd(shape, method):
    w = _random(*shape) + geometric_matrix(*shape, decay=0.8, scale=3.0)
    t = svd.top_k(w, 10, method=method)
    _assert_triplets_match(t, w, 10)
    assert t.method == {"dense": "dense", "krylov": "krylov", "auto": "dense"}[method]  # auto: dense for N ≤ 256


@pytest.mark.parametrize("shape,route", [((400, 300), "krylov"), ((300, 400), "krylov"), ((300, 300), "krylov"),
                                         ((256, 300), "dense"), ((200, 120), "dense")])
def test_auto_route_on_a_separated_spectrum(shape, route):
    """Where the iteration converges at once, auto still takes the dense route up to N = 256 and iterates above."""
    w = geometric_matrix(*shape, decay=0.8)
    t = svd.top_k(w, 10, method="auto")
    _assert_triplets_match(t, w, 10)
    assert t.method == route
    assert svd.top_k(w, 10, method="krylov").method == "krylov"


@pytest.mark.parametrize("shape", [(1040, 530), (530, 1040), (600, 600), (300, 700)])
def test_blocked_gram_is_the_symmetric_product(shape):
    w = _random(*shape, seed=6)
    g = svd.gram(w)
    ref = w @ w.T if shape[0] <= shape[1] else w.T @ w
    assert g.shape == ref.shape and torch.equal(g, g.T)
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1040, 520), (520, 1040), (640, 640)])
def test_top_k_through_the_gram_matrix(shape):
    # rectangular and large enough that the iteration runs on the smaller side's Gram matrix
    w = _random(*shape, seed=4) + geometric_matrix(*shape, decay=0.7, scale=4.0)
    t = svd.top_k(w, 10, method="krylov")
    assert t.method == "krylov"
    _assert_triplets_match(t, w, 10)


def test_krylov_on_random_bulk_converges_or_falls_back():
    # a Gaussian matrix: the worst case for an iterative top-k (tiny relative gaps at the edge)
    w = _random(300, 300, seed=3)
    t = svd.top_k(w, 10, method="auto")
    _assert_triplets_match(t, w, 10)


def test_top_k_rank_deficient_falls_back_to_dense():
    w = geometric_matrix(60, 80)[:, :]  # full rank 60
    low = w[:, :3] @ torch.randn(3, 80, dtype=torch.float64)  # rank 3 < k
    t = svd.top_k(low, 10, method="krylov")
    s = torch.linalg.svdvals(low)
    torch.testing.assert_close(t.s, s[:10], rtol=1e-9, atol=1e-9)
    assert t.method == "dense"


@pytest.mark.parametrize("shape", SHAPES)
def test_base_basis_is_the_complete_singular_basis(shape):
    w = _random(*shape, seed=1)
    base = svd.base_basis(w)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(base.s, s, rtol=1e-10, atol=1e-12)
    ref = u if shape[0] <= shape[1] else vh.T
    assert base.side == ("left" if shape[0] <= shape[1] else "right")
    assert base.basis.shape == (min(shape), min(shape))
    assert (1 - (base.basis.T @ ref).diagonal().abs()).abs().max() < 1e-9
    torch.testing.assert_close(svd.singular_values(w), s, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["krylov", "auto"])
def test_low_rank_update_equals_full_svd(shape, method):
    m, n = shape
    w0 = _random(m, n, seed=2)
    gen = torch.Generator().manual_seed(5)
    left = torch.randn(m, 6, generator=gen, dtype=torch.float64) * 0.3
    right = torch.randn(6, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    t = svd.top_k_low_rank(w0, svd.base_basis(w0), left, right, 10, method=method)
    _assert_triplets_match(t, w0 + left @ right, 10)
    if method == "krylov":
        assert t.method == "chebyshev-lowrank"


def test_k_larger_than_the_matrix():
    w = _random(8, 5)
    t = svd.top_k(w, 10)
    assert t.s.shape == (5,)
    _assert_triplets_match(t, w, 5)


# -- targets ---------------------------------------------------------------------------------------
def test_presets_on_llama_gpt2_bert(tiny_llama, tiny_gpt2, tiny_bert):
    from surgeon.io.checkpoint import Checkpoint

    def names(folder, preset):
        with Checkpoint.open(folder) as ckpt:
            shapes = {n: i.shape for n, i in ckpt.tensors.items()}
            model_type = ckpt.config()["model_type"]
        return {t.module for t in select_targets(shapes, preset, model_type=model_type)}, \
            [t for t in select_targets(shapes, preset, model_type=model_type)]

    assert names(tiny_llama, "qv")[0] == {"self_attn.q_proj", "self_attn.v_proj"}
    assert names(tiny_llama, "mlp")[0] == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert len(names(tiny_llama, "all-linear")[1]) == 2 * 7
    modules, targets = names(tiny_gpt2, "attn")
    assert modules == {"attn.c_attn", "attn.c_proj"} and all(t.transposed for t in targets)
    assert names(tiny_gpt2, "mlp")[0] == {"mlp.c_fc", "mlp.c_proj"}
    assert names(tiny_bert, "qv")[0] == {"attention.self.query", "attention.self.value"}
    assert names(tiny_bert, "mlp")[0] == {"intermediate.dense", "output.dense"}
    assert names(tiny_bert, "attn")[0] == {"attention.self.query", "attention.self.key", "attention.self.value",
                                           "attention.output.dense"}


def test_target_details():
    assert layer_and_module("model.layers.12.self_attn.q_proj.weight") == (12, "self_attn.q_proj")
    assert layer_and_module("lm_head.weight") == (None, "lm_head")
    assert compile_targets(r"q_proj").search("model.layers.0.self_attn.q_proj.weight")
    t = Target("h.0.attn.c_attn.weight", 0, "attn.c_attn", (32, 96), True)
    assert t.linear_shape == (96, 32)


# -- cache -----------------------------------------------------------------------------------------
def test_cache_roundtrip_and_corruption(tmp_path):
    cache = SvdCache(tmp_path / "c")
    w = _random(20, 30)
    base = svd.base_basis(w)
    raw = w.float().numpy().tobytes()
    key = content_key(raw, "F32", (20, 30), transposed=False)
    assert key != content_key(raw, "F32", (20, 30), transposed=True)
    assert cache.load(key, size=20) is None
    cache.store(key, base.side, base.basis, base.s)
    entry = cache.load(key, size=20)
    assert entry.side == "left" and torch.equal(entry.basis, base.basis) and torch.equal(entry.s, base.s)
    assert cache.load(key, size=21) is None  # shape mismatch is a miss
    cache.path(key).write_bytes(b"garbage")  # a broken entry is a miss, not a crash
    assert cache.load(key, size=20) is None
    assert not list((tmp_path / "c").rglob("*.tmp"))


def test_an_interrupted_cache_write_leaves_no_temporary_and_a_killed_writers_is_swept(tmp_path, monkeypatch):
    import subprocess
    import sys

    import surgeon.io.svd_cache as svd_cache

    cache = SvdCache(tmp_path / "c")
    w = _random(20, 30)
    base = svd.base_basis(w)
    key = content_key(w.float().numpy().tobytes(), "F32", (20, 30), transposed=False)
    real_save = svd_cache.save_file

    def save_then_interrupt(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        raise KeyboardInterrupt  # Ctrl-C after the temporary file was written, before the rename

    monkeypatch.setattr(svd_cache, "save_file", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cache.store(key, base.side, base.basis, base.s)
    assert list((tmp_path / "c").rglob("*")) == [cache.path(key).parent]  # its folder, empty
    monkeypatch.setattr(svd_cache, "save_file", real_save)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = cache.path(key).parent
    dead = folder / f".{'0' * 64}.safetensors.{int(gone.stdout)}-0123abcd.tmp"  # a SIGKILLed writer's
    live = folder / f".{'1' * 64}.safetensors.{os.getpid()}-0123abcd.tmp"  # a writer still at work
    other = folder / "notes.tmp"
    for f in (dead, live, other):
        f.write_bytes(b"x")
    cache.store(key, base.side, base.basis, base.s)
    assert sorted(p.name for p in folder.iterdir()) == sorted([cache.path(key).name, live.name, other.name])


# -- the command -------------------------------------------------------------------------------------
def _run(*args: str):
    return CliRunner().invoke(cli, [*args], catch_exceptions=False)


def test_spectrum_top_k_and_full_match_reference(tiny_llama):
    from surgeon.io.checkpoint import Checkpoint

    report = spectrum(tiny_llama, targets="qv", top_k=5, method="krylov")
    full = spectrum(tiny_llama, targets="qv", full=True)
    with Checkpoint.open(tiny_llama) as ckpt:
        for row, row_full in zip(report.matrices, full.matrices):
            w = ckpt.get(row.name, dtype=torch.float64)
            s = torch.linalg.svdvals(w)
            assert row.singular_values == pytest.approx(s[:5].tolist(), rel=1e-9)
            assert row_full.singular_values == pytest.approx(s.tolist(), rel=1e-8, abs=1e-12)
            assert row.spectral_norm == pytest.approx(float(s[0]), rel=1e-10)
            assert row.stable_rank == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-9)
            assert row.effective_rank is None
            p = s / s.sum()
            assert row_full.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-8)
    assert [m.module for m in report.matrices] == ["self_attn.q_proj", "self_attn.v_proj"] * 2


def test_spectrum_cli_outputs(tiny_gpt2, tmp_path):
    result = _run("spectrum", str(tiny_gpt2), "--targets", "attn", "--top-k", "3")
    assert result.exit_code == 0, result.output
    assert "transformer.h.0.attn.c_attn.weight" in result.output and "96x32" in result.output  # Conv1D transposed
    result = _run("spectrum", str(tiny_gpt2), "--targets", "mlp", "--full", "-o", str(tmp_path / "s.json"), "--json")
    body = json.loads(result.output)
    assert body["command"] == "spectrum" and len(body["matrices"]) == 4
    assert len(body["matrices"][0]["singular_values"]) == 32
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["provenance"]["command"] == "spectrum"
    result = _run("spectrum", str(tiny_gpt2), "--targets", "mlp", "--full", "-o", str(tmp_path / "s.safetensors"))
    assert result.exit_code == 0, result.output
    values = load_file(tmp_path / "s.safetensors")
    assert values["transformer.h.1.mlp.c_proj.weight"].dtype == torch.float64


def test_spectrum_full_cache_reused(tiny_bert, tmp_path):
    cold = spectrum(tiny_bert, targets="qv", full=True, cache=tmp_path / "c")
    warm = spectrum(tiny_bert, targets="qv", full=True, cache=tmp_path / "c")
    assert cold.cache == {"hits": 0, "misses": 4} and warm.cache == {"hits": 4, "misses": 0}
    assert [m.singular_values for m in cold.matrices] == [m.singular_values for m in warm.matrices]
    assert {m.method for m in warm.matrices} == {"cache"}


def test_effective_rank_edges():
    assert effective_rank(torch.zeros(4, dtype=torch.float64)) == 0.0
    assert effective_rank(torch.ones(4, dtype=torch.float64)) == pytest.approx(4.0)


def test_spectrum_errors(tiny_llama, tmp_path):
    result = CliRunner().invoke(cli, ["spectrum", str(tiny_llama), "--targets", "attention.self"])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {tiny_llama}: --targets 'attention.self' selects no 2-D floating-point")
    result = CliRunner().invoke(cli, ["spectrum", str(tiny_llama), "--targets", "q_proj(", "--top-k", "2"])
    assert result.exit_code == 1 and "neither a preset (qv, attn, mlp, all-linear) nor a valid regular expression" \
        in result.output
    result = CliRunner().invoke(cli, ["spectrum", str(tiny_llama), "-o", str(tmp_path / "x.csv")])
    assert result.exit_code == 1 and "-o takes a .json file" in result.output
    result = CliRunner().invoke(cli, ["spectrum", str(tiny_llama), "--top-k", "0"])
    assert result.exit_code == 1 and "--top-k 0: give a positive number" in result.output


def test_regex_targets_on_a_single_file(tmp_path):
    w = geometric_matrix(40, 30, decay=0.7)
    path = save_matrices(tmp_path / "m.safetensors", {"encoder.block.0.w.weight": w, "bias": torch.ones(3)})
    report = spectrum(path, targets=r"block\.\d+\.w", top_k=3)
    assert [m.name for m in report.matrices] == ["encoder.block.0.w.weight"]
    assert report.matrices[0].singular_values == pytest.approx([0.7 ** i for i in range(3)], rel=1e-6)


def test_read_ahead_deferred_waits_for_the_consumer():
    """Deferred read-ahead starts the next load only on prefetch() (or when the next item is asked for);
    the plain one keeps a load in flight while the consumer works. Same items, same order either way."""
    import threading
    import time

    from surgeon.workflows.spectral.spectrum import ReadAhead, read_ahead

    started: list[int] = []
    lock = threading.Lock()

    def load(i: int) -> int:
        with lock:
            started.append(i)
        return i * i

    stream = ReadAhead(range(4), load, deferred=True)
    seen = []
    for i, value in stream:
        with lock:
            assert started == list(range(i + 1))  # nothing beyond the current item was started
        seen.append((i, value))
        if i == 1:
            stream.prefetch()
            stream.prefetch()  # idempotent: one item ahead at most
            deadline = time.monotonic() + 10
            while len(started) < 3 and time.monotonic() < deadline:
                time.sleep(0.001)
            with lock:
                assert started == [0, 1, 2]
    assert seen == [(i, i * i) for i in range(4)]
    started.clear()
    assert list(read_ahead(range(3), load)) == [(0, 0), (1, 1), (2, 4)]


def test_keep_freed_memory_is_a_process_setting(monkeypatch):
    """glibc's malloc keeps freed buffers (no mapping per buffer) once the spectral stream asks; SURGEON_MALLOC=0
    leaves it alone; a big buffer allocated and freed twice still reads back what was written."""
    import ctypes.util

    from surgeon.workflows.device import keep_freed_memory

    keep_freed_memory.cache_clear()
    monkeypatch.setenv("SURGEON_MALLOC", "0")
    assert keep_freed_memory() is False
    keep_freed_memory.cache_clear()
    monkeypatch.delenv("SURGEON_MALLOC")
    glibc = ctypes.util.find_library("c") is not None and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    assert keep_freed_memory() is glibc
    for value in (1.0, 2.0):
        big = torch.full((3000, 3000), value, dtype=torch.float64)  # 72 MB: from the heap now
        assert float(big.sum()) == value * 9e6
        del big
