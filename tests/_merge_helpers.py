"""Builders for merge tests: adapters made and merged by peft itself (the reference).

Adapters are created with ``get_peft_model`` on the tiny fixture models, their
parameters set to random non-trivial values, and saved with ``save_pretrained``;
references are ``PeftModel.from_pretrained(...).merge_and_unload()``. Nothing here
uses surgeon's merge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from conftest import TOKENIZER_FILES


def model_class(folder: Path) -> type:
    import transformers

    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch)


def load_model(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return model_class(folder).from_pretrained(folder, dtype=dtype).eval()


def save_model(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    for name, text in TOKENIZER_FILES.items():
        (folder / name).write_text(text)
    return folder


def cast_base(folder: Path, out: Path, dtype: torch.dtype) -> Path:
    """The fixture model saved in another dtype (a bf16/fp16 base)."""
    return save_model(load_model(folder).to(dtype), out)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Give every trainable adapter parameter a random, non-trivial value (zero-init B included)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype)
        if "magnitude" in name or "ia3_l" in name:
            param.mul_(1 + 0.3 * noise)  # multiplicative factors stay around their init
        else:
            param.add_(noise * scale)


def make_adapter(base: Path, out: Path, config: Any, *, seed: int = 1, scale: float = 0.1,
                 prepare: Any = None) -> Path:
    """Create, randomize and save a peft adapter of ``config`` for the model in ``base``."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(base), config)
    if prepare is not None:
        prepare(model)
    _randomize(model, seed, scale)
    model.save_pretrained(out)
    return out


def peft_model(base: Path, adapters: list[tuple[Path, float]], dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The unmerged PeftModel with every adapter loaded, scaled by its weight and active."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, dtype), adapters[0][0], adapter_name="a0")
    for i, (path, _) in enumerate(adapters[1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    for i, (_, weight) in enumerate(adapters):
        if weight != 1.0:
            for module in model.modules():
                if hasattr(module, "set_scale") and f"a{i}" in getattr(module, "scaling", {}):
                    module.set_scale(f"a{i}", weight)
    model.base_model.set_adapter(names) if len(names) > 1 else model.set_adapter(names[0])
    return model.eval()


def peft_merged(base: Path, adapters: list[tuple[Path, float]],
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload() state dict (the reference)."""
    model = peft_model(base, adapters, dtype)
    names = [f"a{i}" for i in range(len(adapters))]
    with torch.no_grad():
        merged = model.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float32 tensors."""
    ia = a.float().contiguous().view(torch.int32).long()
    ib = b.float().contiguous().view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if ia.numel() else 0
