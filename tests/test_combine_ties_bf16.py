"""`surgeon combine` with magnitude pruning on bf16 adapters whose factors tie by the hundred: peft keeps
torch.topk's k values, and surgeon the same ones (ΔW of every module within 1e-6 of peft's; float32 output,
as peft's combined adapter is in the float32 the model loaded the bf16 factors into)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgeon.workflows.combine import CombineOptions, combine_adapters
from test_combine_peft import GPT2_TARGETS, LLAMA_TARGETS, _assert_close, _make_lora, _ours, _peft_reference


def _tied_bf16(folder: Path, seed: int) -> Path:
    """The adapter's factors replaced by bf16 multiples of 1/4 in [-0.75, 0.75]: |value| takes 4 values."""
    path = folder / "adapter_model.safetensors"
    gen = torch.Generator().manual_seed(seed)
    state = {k: (0.25 * torch.randint(-3, 4, v.shape, generator=gen)).to(torch.bfloat16) if "lora_" in k else v
             for k, v in load_file(path).items()}
    save_file(state, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def tied(tiny_llama, tiny_gpt2, tmp_path_factory):
    """Three tied bf16 LoRAs per model: Llama (q/v projections and the embedding), GPT-2 (Conv1D, fan_in_fan_out)."""
    root = tmp_path_factory.mktemp("tied-adapters")
    llama = [_make_lora(tiny_llama, root / f"l{i}", r=4, alpha=8, targets=LLAMA_TARGETS[0], seed=40 + i)
             for i in range(3)]
    gpt2 = [_make_lora(tiny_gpt2, root / f"g{i}", r=4, alpha=8, targets=GPT2_TARGETS[0], seed=50 + i,
                       fan_in_fan_out=True) for i in range(3)]
    return {"llama": (tiny_llama, [_tied_bf16(f, i) for i, f in enumerate(llama)]),
            "gpt2": (tiny_gpt2, [_tied_bf16(f, 10 + i) for i, f in enumerate(gpt2)])}


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "ties_svd", "magnitude_prune_svd"])
@pytest.mark.parametrize("count, weights", [(2, [0.7, -0.4]), (3, [1.0, 0.5, -0.3])])
@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_tied_magnitudes_prune_like_peft(model, method, count, weights, tied, tmp_path):
    base, adapters = tied[model]
    kw = {"density": 0.3, **({"svd_rank": 3} if method.endswith("svd") else {})}
    ref = _peft_reference(base, adapters[:count], weights, method, **kw)
    combine_adapters(list(zip(adapters[:count], weights)), tmp_path / "out",
                     options=CombineOptions(method=method, density=kw["density"], svd_rank=kw.get("svd_rank"),
                                            dtype="F32"))  # peft's result stays in the float32 it loaded
    _assert_close(_ours(base, tmp_path / "out"), ref, 1e-4 if method.endswith("svd") else 1e-6)
