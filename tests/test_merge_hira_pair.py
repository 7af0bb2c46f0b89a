"""Two HiRA adapters on one tensor, merged as peft merges them: peft sums the adapters' B·A first and adds
W₀ ⊙ (0 + ΔA + ΔB) in one step (hira/layer.py ``_merge``), not one adapter after the other."""

from __future__ import annotations

import peft
import pytest
import torch

from _merge_helpers import make_adapter, peft_merged, read_folder
from surgeon.workflows.merge import merge


@pytest.mark.parametrize("count", [2, 3])
def test_several_hira_adapters_equal_peft_bit_for_bit(tiny_llama, tmp_path, count):
    """Also the embedding, whose adapters each carry a saved copy of the frozen base (peft loads them all
    before merging any). peft's HiRA layers have no per-adapter scale, so every weight is 1."""
    config = peft.HiraConfig(r=4, target_modules=["q_proj", "down_proj", "embed_tokens"])
    adapters = [(make_adapter(tiny_llama, tmp_path / f"h{i}", config, seed=i + 1), 1.0) for i in range(count)]
    reference = peft_merged(tiny_llama, adapters)
    merge(tiny_llama, adapters, tmp_path / "out", dtype="fp32")
    got = read_folder(tmp_path / "out")
    assert sorted(got) == sorted(reference)
    for name, tensor in got.items():
        assert torch.equal(tensor.view(torch.int32), reference[name].view(torch.int32)), name
