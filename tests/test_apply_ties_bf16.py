"""Magnitude methods on bf16 fine-tunes, where many |τ| tie at the density threshold: surgeon keeps exactly
the elements mergekit 0.1.5 keeps (its torch.argsort is not stable, so the tie order is that sort's), checked
against mergekit itself and, for the native kernel that follows the sort, against torch.sort directly."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy
import pytest
import torch
from safetensors.torch import load_file, save_file

from surgeon.ops import native_gta
from surgeon.ops.combine import della_probabilities, magnitude_mask, sorted_positions, unpack_bits
from surgeon.workflows.taskvec.apply import apply_task_vectors
from surgeon.workflows.taskvec.methods import ApplyOptions
from conftest import _save, tiny_llama_config
from test_apply_methods_mergekit import DRIVER, MERGEKIT, TOL, _config

STEP = 2.0**-10  # weights on a grid of STEP below 0.25 are exact in bf16, and so are whole-STEP moves

# name -> (surgeon inputs (fine-tune index, weight), options, mergekit YAML body)
CASES = {
    "ties": ([(1, 1.0), (2, 0.6)], ApplyOptions(method="ties", density=0.4), "merge_method: ties\n"),
    "ties_three_negative": ([(1, 1.0), (2, -0.5), (3, 0.8)], ApplyOptions(method="ties", density=0.3),
                            "merge_method: ties\n"),
    "ties_rescaled": ([(1, 0.8), (2, 0.7)], ApplyOptions(method="ties", density=0.55, rescale=True),
                      "merge_method: ties\nparameters: {rescale: true}\n"),
    "breadcrumbs": ([(1, 0.9), (2, 0.4)], ApplyOptions(method="breadcrumbs", density=0.5, gamma=0.05),
                    "merge_method: breadcrumbs\n"),
    "breadcrumbs_ties": ([(1, 0.9), (2, 0.4)], ApplyOptions(method="breadcrumbs_ties", density=0.6, gamma=0.02),
                         "merge_method: breadcrumbs_ties\n"),
}


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    """A bf16 tiny Llama (a 2048 × 64 embedding: deep partitions), its weights on a grid of STEP, and three bf16
    fine-tunes moved by whole STEPs (exact in bf16): |τ| ∈ {0, STEP, 2·STEP}, ties by the thousand."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=2048, hidden_size=64, intermediate_size=128))
    with torch.no_grad():
        for p in model.parameters():
            if float(p.abs().max()) < 0.2:
                p.copy_((p / STEP).round() * STEP)
    base = _save(model.to(torch.bfloat16), tmp_path_factory.mktemp("bf16_base"))
    weights = load_file(base / "model.safetensors")
    fts = {}
    for i in (1, 2, 3):
        gen = torch.Generator().manual_seed(200 + i)
        folder = tmp_path_factory.mktemp(f"bf16_ft{i}")
        moved = {n: (t.float() + STEP * torch.randint(-2, 3, t.shape, generator=gen)).to(torch.bfloat16)
                 for n, t in weights.items()}
        save_file(moved, folder / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(base / "config.json", folder / "config.json")
        fts[i] = folder
    return base, fts


def test_the_fixture_has_ties_at_the_threshold(bf16_models):
    base, fts = bf16_models
    b, f = load_file(base / "model.safetensors"), load_file(fts[1] / "model.safetensors")
    name = "model.embed_tokens.weight"
    tau = (f[name].float() - b[name].float()).abs().reshape(-1)
    kth = tau.sort(descending=True).values[int(0.4 * tau.numel()) - 1]
    assert int((tau == kth).sum()) > 1000


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit 0.1.5 is not installed in a venv "
                    "(set SURGEON_MERGEKIT_PYTHON, or see .ci/run for the install)")
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_bf16_ties_keep_mergekits_elements(bf16_models, tmp_path, monkeypatch, native):
    """float32 outputs on both sides: the elements each method changed are mergekit's, and every value is
    within 1e-6 relative; bf16 outputs (one rounding on both sides) are equal too."""
    base, fts = bf16_models
    if not native:
        monkeypatch.setenv("SURGEON_NATIVE", "0")
    jobs, pairs = [], []
    for name, (inputs, opts, body) in CASES.items():
        for out_dtype in ("F32", "BF16"):
            ours = tmp_path / f"surgeon-{name}-{out_dtype}"
            apply_task_vectors(base, [(fts[i], w) for i, w in inputs], ours, options=opts, dtype=out_dtype)
            config = json.loads(_config(base, fts, inputs, opts, body))
            config["out_dtype"] = "float32" if out_dtype == "F32" else "bfloat16"
            theirs = tmp_path / f"mergekit-{name}-{out_dtype}"
            jobs.append({"kind": "merge", "out": str(theirs), "seed": 0, "config": json.dumps(config)})
            pairs.append((name, ours, theirs))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([MERGEKIT, str(DRIVER), str(tmp_path / "jobs.json")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    b = {n: t.float() for n, t in load_file(base / "model.safetensors").items()}
    for case, ours, theirs in pairs:
        x, y = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
        assert set(x) == set(y)
        for name, ref in y.items():
            assert x[name].dtype == ref.dtype, (case, name)
            changed_ours, changed_theirs = x[name].float() != b[name], ref.float() != b[name]
            assert torch.equal(changed_ours, changed_theirs), (case, name, int((changed_ours ^ changed_theirs).sum()))
            err = float((x[name].double() - ref.double()).abs().max())
            assert err <= TOL * float(ref.double().abs().max()), (case, name, err)


def _reference_mask(values: torch.Tensor, descending: bool, lo: int, hi: int) -> torch.Tensor:
    """What mergekit does: torch's (unstable) sort of the magnitudes, positions [lo, hi) kept."""
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[torch.sort(values, descending=descending).indices[lo:hi]] = True
    return keep


@pytest.mark.skipif(native_gta.kernel() is None, reason="no C compiler: the torch sort decides (tested above)")
@pytest.mark.parametrize("numel", [1, 16, 17, 33, 1000, 4099, 70_001, 1_000_003])
def test_the_native_selection_is_torchs_sort(numel):
    """Tie-heavy magnitudes (bf16 differences, small integers), both sort directions, random boundaries."""
    lib = native_gta.kernel()
    gen = torch.Generator().manual_seed(numel)
    a = torch.randn(numel, generator=gen).bfloat16().float()
    samples = [((a + 0.01 * torch.randn(numel, generator=gen)).bfloat16().float() - a).abs(),
               torch.randint(0, 4, (numel,), generator=gen).float(), torch.rand(numel, generator=gen)]
    for values in samples:
        for descending in (True, False):
            hi = int(torch.randint(0, numel + 1, (1,), generator=gen))
            lo = int(torch.randint(0, hi + 1, (1,), generator=gen))
            mask = numpy.zeros(numel, dtype=numpy.uint8)
            kept = native_gta.sorted_range(lib, values.numpy().copy(), descending=descending, lo=lo, hi=hi,
                                           mask=mask)
            expected = _reference_mask(values, descending, lo, hi)
            assert kept is not None
            assert numpy.array_equal(mask.astype(bool), expected.numpy()), (numel, descending, lo, hi)
            assert kept == pytest.approx(float(values[expected].double().sum()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("method,density,gamma", [("magnitude", 0.37, 0.0), ("magnitude_outliers", 0.5, 0.05)])
def test_magnitude_mask_falls_back_to_the_sort_it_follows(method, density, gamma, monkeypatch):
    """Without the kernel, and where the kernel gives up (the sort's heapsort depth), the sort itself decides."""
    gen = torch.Generator().manual_seed(3)
    values = torch.randint(0, 5, (50_000,), generator=gen).float()
    descending, lo, hi = sorted_positions(values.numel(), density, method=method, gamma=gamma)
    expected = _reference_mask(values, descending, lo, hi)
    for route in ("native", "torch", "gave up"):
        with monkeypatch.context() as patch:
            if route == "torch":
                patch.setenv("SURGEON_NATIVE", "0")
            if route == "gave up":
                patch.setattr(native_gta, "sorted_range_pairs", lambda *a, **k: None)
            bits, total = magnitude_mask(values, density, method=method, gamma=gamma)
        assert torch.equal(unpack_bits(bits, 0, values.numel()), expected), route
        assert total == pytest.approx(float(values[expected].double().sum()), rel=1e-12), route
        assert unpack_bits(bits, 12345, 999).tolist() == expected[12345:13344].tolist()


@pytest.mark.skipif(MERGEKIT is None, reason="mergekit 0.1.5 is not installed in a venv "
                    "(set SURGEON_MERGEKIT_PYTHON, or see .ci/run for the install)")
def test_della_ranks_tied_magnitudes_as_mergekit(bf16_models, tmp_path):
    """DELLA's keep probability follows the magnitude rank within a row; with ties the rank is the sort's
    order, so our probabilities equal the ones mergekit hands to torch.bernoulli, element by element."""
    base, fts = bf16_models
    b, f = load_file(base / "model.safetensors"), load_file(fts[1] / "model.safetensors")
    taus = {n: (f[n].float() - b[n].float()).contiguous() for n in b}
    save_file(taus, tmp_path / "taus.safetensors")
    job = {"kind": "della_probs", "taus": str(tmp_path / "taus.safetensors"), "out": str(tmp_path / "p.safetensors"),
           "density": 0.5, "epsilon": 0.2}
    (tmp_path / "jobs.json").write_text(json.dumps([job]))
    done = subprocess.run([MERGEKIT, str(DRIVER), str(tmp_path / "jobs.json")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = load_file(tmp_path / "p.safetensors")
    for name, tau in taus.items():
        rows = tau.reshape(1, -1) if tau.dim() < 2 else tau
        ours = della_probabilities(rows, 0.5, 0.2).float().reshape(tau.shape)
        assert float((ours - theirs[name]).abs().max()) < 1e-6, name


@pytest.mark.skipif(native_gta.kernel() is None, reason="no C compiler: only the torch path runs")
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "magnitude_prune", "task_arithmetic"])
@pytest.mark.parametrize("dtype", [None, "F32", "F16"])
def test_native_and_torch_paths_write_the_same_bytes(method, dtype, bf16_models, tmp_path, monkeypatch):
    base, fts = bf16_models
    opts = ApplyOptions(method=method, density=0.45, lambda_scale=0.8,
                        normalize=True if method == "task_arithmetic" else None)
    inputs = [(fts[1], 0.9), (fts[2], -0.4), (fts[3], 0.6)]
    apply_task_vectors(base, inputs, tmp_path / "native", options=opts, dtype=dtype)
    monkeypatch.setenv("SURGEON_NATIVE", "0")
    apply_task_vectors(base, inputs, tmp_path / "torch", options=opts, dtype=dtype)
    written = [(tmp_path / path / "model.safetensors").read_bytes() for path in ("native", "torch")]
    assert written[0] == written[1]
