"""DARE masks: the counter generator against an independent pure-Python splitmix64, kept fraction within 1% of
density, kept values rescaled exactly, same seed -> same bytes (whatever the block split), and the DARE
combinations of `surgeon combine` built from those masks as peft's formulas say."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from surgeon.ops.combine import peft_random_prune
from surgeon.ops.counter_rng import bernoulli_mask, stream_key, uniform24
from surgeon.workflows.combine import CombineOptions, combine_adapters
from test_combine_peft import _make_lora

MASK64 = (1 << 64) - 1


def _splitmix64(key: int, index: int) -> int:
    z = (key + index * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_draws_are_splitmix64_of_a_blake2b_key():
    key = int.from_bytes(hashlib.blake2b(b"7\x1fmodel.layers.0.q_proj.weight\x1f1", digest_size=8).digest(), "little")
    assert stream_key(7, "model.layers.0.q_proj.weight", 1) == key
    start = 10**12  # far along the stream: uint64 wrap-around is exercised
    expected = [(_splitmix64(key, start + i) >> 40) / 2**24 for i in range(64)]
    assert uniform24(key, start, 64).tolist() == expected


def test_masks_do_not_depend_on_how_the_tensor_is_split():
    key = stream_key(3, "w")
    whole = bernoulli_mask(key, 0, (100, 70), 0.4)
    parts = torch.cat([bernoulli_mask(key, r * 70, (10, 70), 0.4) for r in range(0, 100, 10)])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_kept_fraction_and_exact_rescale(density):
    tensor = torch.randn(1000, 1000, generator=torch.Generator().manual_seed(0))
    pruned = peft_random_prune(tensor, density, stream_key(1, "t"))
    kept = pruned != 0
    assert abs(float(kept.float().mean()) - density) < 0.01
    assert torch.equal(pruned[kept], tensor[kept] / density)  # kept values rescaled by exactly 1/density
    assert torch.equal(pruned, peft_random_prune(tensor, density, stream_key(1, "t")))
    assert not torch.equal(pruned, peft_random_prune(tensor, density, stream_key(2, "t")))


@pytest.fixture(scope="module")
def two_loras(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("dare")
    return [_make_lora(tiny_llama, root / f"l{i}", r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"], seed=40 + i)
            for i in range(2)]


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_same_seed_same_bytes_other_seed_other_masks(method, two_loras, tmp_path):
    def run(seed: int, name: str) -> bytes:
        combine_adapters(list(zip(two_loras, [0.6, 0.4])), tmp_path / name,
                         options=CombineOptions(method=method, density=0.5, seed=seed))
        return (tmp_path / name / "adapter_model.safetensors").read_bytes()

    first = run(11, "a")
    assert run(11, "b") == first
    assert run(12, "c") != first
    prov = json.loads((tmp_path / "a" / "surgeon_provenance.json").read_text())
    assert prov["parameters"]["seed"] == 11 and prov["parameters"]["method"] == method


def test_dare_linear_factors_are_peft_formula_on_the_kept_values(two_loras, tmp_path):
    """With the second weight 0 (peft's √0 zeroes it), A = √(w·s)·(A₀ ⊙ M)/density: check the kept fraction,
    that every kept value is exactly that, and that pruned values are zero."""
    density = 0.5
    combine_adapters(list(zip(two_loras, [0.6, 0.0])), tmp_path / "out",
                     options=CombineOptions(method="dare_linear", density=density, seed=5))
    ours = load_file(tmp_path / "out" / "adapter_model.safetensors")
    source = load_file(two_loras[0] / "adapter_model.safetensors")
    factor = (0.6 * 16 / 8) ** 0.5
    kept_total, count = 0, 0
    for key, tensor in ours.items():
        kept = tensor != 0
        kept_total += int(kept.sum())
        count += tensor.numel()
        expected = (source[key] / density) * factor
        assert torch.allclose(tensor[kept], expected[kept], rtol=1e-6, atol=0), key
    assert abs(kept_total / count - density) < 0.03  # ~6000 values: 1% is the ops test above on 10^6
