"""Builders for diff / apply / extract-lora tests: real peft merges and a real (tiny) fine-tune.

Everything is made with peft and transformers themselves (the references), never
with surgeon's own merge.
"""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def load_causal_lm(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)


def _save(model: torch.nn.Module, base: Path, out: Path) -> Path:
    model.save_pretrained(out, safe_serialization=True)
    for side in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (base / side).exists() and not (out / side).exists():
            (out / side).write_bytes((base / side).read_bytes())
    return out


def make_lora_adapter(base: Path, out: Path, *, targets: list[str] = LLAMA_TARGETS, r: int = 4, alpha: float = 8,
                      seed: int = 1, **config: object) -> Path:
    """A LoRA adapter for ``base`` with random nonzero B (and A), saved by peft."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    model.save_pretrained(out)
    return out


def merge_with_peft(base: Path, adapter: Path, out: Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Load ``base`` in ``dtype``, apply ``adapter`` with peft, ``merge_and_unload``, save."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(base, dtype), adapter)
    merged = model.merge_and_unload()
    return _save(merged, base, out)


def perturb_adapter(adapter: Path, out: Path, *, module_substring: str, factor: float = 1.01) -> Path:
    """A copy of ``adapter`` with the lora_B of modules containing ``module_substring`` scaled."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    (out / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    tensors = load_file(adapter / "adapter_model.safetensors")
    hit = 0
    for key in tensors:
        if module_substring in key and "lora_B" in key:
            tensors[key] = tensors[key] * factor
            hit += 1
    if not hit:
        raise ValueError(f"no lora_B contains {module_substring!r}")
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def full_finetune(base: Path, out: Path, *, steps: int = 3, lr: float = 1e-2, seed: int = 2,
                  dtype: torch.dtype = torch.float32) -> Path:
    """A few Adam steps of next-token loss on random tokens: every parameter moves."""
    torch.manual_seed(seed)
    model = load_causal_lm(base)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    vocab = model.config.vocab_size
    for _ in range(steps):
        ids = torch.randint(0, vocab, (4, 16))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return _save(model.to(dtype), base, out)


def lora_factors(adapter: Path, module: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(s, A (r × in), B (out × r)) of one Linear module, float64, from the adapter files."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    a = t[f"base_model.model.{module}.lora_A.weight"].double()
    b = t[f"base_model.model.{module}.lora_B.weight"].double()
    return cfg["lora_alpha"] / cfg["r"], a, b


def lora_delta(adapter: Path, module: str) -> torch.Tensor:
    """s·B·A (out × in, float32, computed in float64) of one Linear module."""
    s, a, b = lora_factors(adapter, module)
    return (s * b @ a).float()


def float32_merge_bound(adapter: Path, module: str, base: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |τ − s·B·A| for a float32 merge W + s·B·A: the textbook error of an
    r-term dot product plus one addition, (r + 2)·eps·(|W| + s·|B|·|A|)."""
    s, a, b = lora_factors(adapter, module)
    eps = torch.finfo(torch.float32).eps
    return ((a.shape[0] + 2) * eps * (base.double().abs() + s * b.abs() @ a.abs())).float()
