"""`surgeon combine` against peft's own add_weighted_adapter and convert_to_lora, on tiny Llama and GPT-2 adapters.

For each combination type peft builds the combined adapter in a PeftModel from the same adapter folders;
ours is written by surgeon and loaded back with PeftModel.from_pretrained (so it must be loadable). ΔW of
every module (peft's get_delta_weight, scaling included) must agree within 1e-6 relative (max-norm) for
the deterministic types and 1e-4 for the _svd types. DARE draws random masks (peft from torch's global
generator, ours from the counter generator), so tests/test_combine_dare.py checks its properties instead.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from surgeon.errors import OptionError
from surgeon.workflows.combine import CombineOptions, combine_adapters

DETERMINISTIC = ("linear", "cat", "ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "magnitude_prune_svd")
LLAMA_TARGETS = (["q_proj", "v_proj", "embed_tokens"], ["q_proj", "v_proj", "up_proj", "embed_tokens"],
                 ["q_proj", "v_proj", "embed_tokens"])
GPT2_TARGETS = (["c_attn", "c_proj"], ["c_attn"], ["c_attn", "c_fc"])


def _load(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def _make_lora(base: Path, out: Path, *, r: int, alpha: float, targets: list[str], seed: int, **kw) -> Path:
    """A saved LoRA with random A and B (peft initialises B to zero; a combined zero adapter tests nothing)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_load(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-adapters")
    return {
        "equal": [_make_lora(tiny_llama, root / f"eq{i}", r=4, alpha=a, targets=LLAMA_TARGETS[i], seed=i)
                  for i, a in enumerate((8, 16, 4))],
        "unequal": [_make_lora(tiny_llama, root / "r4", r=4, alpha=8, targets=LLAMA_TARGETS[0], seed=10),
                    _make_lora(tiny_llama, root / "r8", r=8, alpha=8, targets=LLAMA_TARGETS[1], seed=11,
                               use_rslora=True)],
    }


@pytest.fixture(scope="module")
def gpt2_adapters(tiny_gpt2, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2-adapters")
    return {
        "equal": [_make_lora(tiny_gpt2, root / f"eq{i}", r=4, alpha=8, targets=GPT2_TARGETS[i], seed=20 + i,
                             fan_in_fan_out=True) for i in range(3)],
        "unequal": [_make_lora(tiny_gpt2, root / "r2", r=2, alpha=4, targets=GPT2_TARGETS[0], seed=30,
                               fan_in_fan_out=True),
                    _make_lora(tiny_gpt2, root / "r6", r=6, alpha=12, targets=GPT2_TARGETS[2], seed=31,
                               fan_in_fan_out=True)],
    }


def _deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and (adapter in module.lora_A or adapter in module.lora_embedding_A):
            out[name] = module.get_delta_weight(adapter).detach().clone()
    return out


def _peft_reference(base: Path, adapters: list[Path], weights: list[float], method: str, **kw) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load(base), adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], weights, "mix", combination_type=method, **kw)
    return _deltas(model, "mix")


def _ours(base: Path, folder: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    return _deltas(PeftModel.from_pretrained(_load(base), folder, adapter_name="ours"), "ours")


def _assert_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float) -> None:
    assert ours.keys() == ref.keys() and ref
    for name, r in ref.items():
        err = float((ours[name].double() - r.double()).abs().max())
        assert err <= tol * float(r.double().abs().max()), (name, err, float(r.abs().max()))


CASES = [  # (model, adapter set, how many, weights)
    ("llama", "equal", 2, [0.7, -0.4]),
    ("llama", "equal", 3, [1.0, 0.5, -0.3]),
    ("gpt2", "equal", 2, [0.6, 0.8]),
    ("gpt2", "equal", 3, [-0.5, 1.2, 0.4]),
]


def _kw(method: str) -> dict[str, float | int]:
    kw: dict[str, float | int] = {}
    if method not in ("linear", "cat", "svd"):
        kw["density"] = 0.5
    if method.endswith("svd"):
        kw["svd_rank"] = 3
    return kw


@pytest.mark.parametrize("method", DETERMINISTIC + SVD_TYPES)
@pytest.mark.parametrize("model, kind, count, weights", CASES)
def test_equal_ranks_match_peft(method, model, kind, count, weights, tiny_llama, tiny_gpt2, llama_adapters,
                                gpt2_adapters, tmp_path):
    base, sets = (tiny_llama, llama_adapters) if model == "llama" else (tiny_gpt2, gpt2_adapters)
    adapters = sets[kind][:count]
    kw = _kw(method)
    ref = _peft_reference(base, adapters, weights, method, **kw)
    options = CombineOptions(method=method, density=kw.get("density"), svd_rank=kw.get("svd_rank"))
    combine_adapters(list(zip(adapters, weights)), tmp_path / "out", options=options)
    _assert_close(_ours(base, tmp_path / "out"), ref, 1e-4 if method.endswith("svd") else 1e-6)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    rank = 4 * count if method == "cat" else (3 if method.endswith("svd") else 4)
    assert (config["r"], config["lora_alpha"]) == (rank, rank)


@pytest.mark.parametrize("method", ["cat", "svd", "ties_svd", "magnitude_prune_svd"])
@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_unequal_ranks_match_peft(method, model, tiny_llama, tiny_gpt2, llama_adapters, gpt2_adapters, tmp_path):
    base, sets = (tiny_llama, llama_adapters) if model == "llama" else (tiny_gpt2, gpt2_adapters)
    adapters, weights = sets["unequal"], [0.9, -0.6]
    kw = {"density": 0.6} if method not in ("cat", "svd") else {}
    ref = _peft_reference(base, adapters, weights, method, **kw)  # svd rank: the largest input rank, as peft
    combine_adapters(list(zip(adapters, weights)), tmp_path / "out",
                     options=CombineOptions(method=method, density=kw.get("density")))
    _assert_close(_ours(base, tmp_path / "out"), ref, 1e-4 if method.endswith("svd") else 1e-6)


def test_svd_clamp_matches_peft(tiny_llama, llama_adapters, tmp_path):
    adapters, weights = llama_adapters["equal"][:2], [0.8, 0.5]
    ref = _peft_reference(tiny_llama, adapters, weights, "svd", svd_rank=4, svd_clamp=0.9)
    combine_adapters(list(zip(adapters, weights)), tmp_path / "out",
                     options=CombineOptions(method="svd", svd_rank=4, svd_clamp=0.9))
    _assert_close(_ours(tiny_llama, tmp_path / "out"), ref, 1e-4)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "magnitude_prune"])
def test_equal_rank_methods_refuse_unequal_ranks_and_name_what_works(method, llama_adapters, tmp_path):
    with pytest.raises(OptionError, match=r"needs adapters of equal rank, got ranks 4, 8; use --method cat"):
        combine_adapters(llama_adapters["unequal"], tmp_path / "out",
                         options=CombineOptions(method=method, density=0.5))
    assert not (tmp_path / "out").exists()


def _peft_converted(base: Path, adapter: Path, rank: int | float) -> dict[str, torch.Tensor]:
    """ΔW of peft's convert_to_lora result, rebuilt from its state dict (scaling is 1: r = alpha)."""
    from peft import PeftModel, convert_to_lora

    model = PeftModel.from_pretrained(_load(base), adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, state = convert_to_lora(model, rank)
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            out[module] = state[f"{module}.lora_B.weight"] @ a
    return out


def _ours_products(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] and cfg["rank_pattern"] == {k: v for k, v in cfg["alpha_pattern"].items()}
    state = load_file(folder / "adapter_model.safetensors")
    return {k[: -len(".lora_A.weight")]: state[k.replace("lora_A", "lora_B")] @ a
            for k, a in state.items() if k.endswith(".lora_A.weight")}


@pytest.mark.parametrize("rank", [2, 0.9])
def test_one_lora_converts_like_convert_to_lora(rank, tiny_llama, tmp_path):
    adapter = _make_lora(tiny_llama, tmp_path / "lora", r=6, alpha=12, targets=["q_proj", "v_proj", "up_proj"], seed=5)
    ref = _peft_converted(tiny_llama, adapter, rank)
    report = combine_adapters([adapter], tmp_path / "out", options=CombineOptions(method="svd", svd_rank=rank))
    assert report.combination == "convert_to_lora"
    _assert_close(_ours_products(tmp_path / "out"), ref, 1e-4)
    _assert_close(_ours(tiny_llama, tmp_path / "out"), ref, 1e-4)  # loads in peft, scaling 1: the same ΔW


def test_lokr_converts_like_convert_to_lora_with_the_base(tiny_llama, tmp_path):
    from peft import LoKrConfig, get_peft_model

    torch.manual_seed(7)
    model = get_peft_model(_load(tiny_llama), LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lokr_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path / "lokr")
    ref = _peft_converted(tiny_llama, tmp_path / "lokr", 5)
    with pytest.raises(OptionError, match="needs the base model"):
        combine_adapters([tmp_path / "lokr"], tmp_path / "nobase", options=CombineOptions(method="svd", svd_rank=5))
    combine_adapters([tmp_path / "lokr"], tmp_path / "out", options=CombineOptions(method="svd", svd_rank=5),
                     base=tiny_llama)
    _assert_close(_ours_products(tmp_path / "out"), ref, 1e-4)
