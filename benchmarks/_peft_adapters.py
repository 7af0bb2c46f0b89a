"""Benchmark adapters of tuners other than LoRA, written in peft's own saved layout for a Llama-shaped
checkpoint without building the model: peft wraps one layer of each distinct shape (on the meta device)
to give the tensor names and shapes, which are then filled with random values for every layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from benchmarks._models import LORA_TARGETS


def _layout(config_dict: dict, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """{name relative to the module: shape} of the adapter tensors peft saves for one Linear layer."""
    import peft
    from peft.utils import get_peft_model_state_dict

    root = nn.Module()
    with torch.device("meta"):
        root.layer = nn.Linear(in_features, out_features, bias=False)
    config = peft.PeftConfig.from_peft_type(**{**config_dict, "target_modules": ["layer"]})
    model = peft.get_peft_model(root, config)
    prefix = "base_model.model.layer."
    return {k[len(prefix):]: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


def build_oft_adapter(model_folder: str | Path, out_folder: str | Path, *, block_size: int = 32,
                      targets: tuple[str, ...] = LORA_TARGETS, seed: int = 1) -> Path:
    """Write (or reuse) a PEFT OFT adapter (``oft_block_size`` blocks, float32) on ``targets`` of every layer."""
    import peft

    model_folder, out = Path(model_folder), Path(out_folder)
    cfg = json.loads((model_folder / "config.json").read_text())
    spec = {"model": str(model_folder.resolve()), "type": "OFT", "block_size": block_size, "targets": list(targets),
            "seed": seed, "layers": cfg["num_hidden_layers"]}
    marker = out / "bench_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = peft.OFTConfig(r=0, oft_block_size=block_size, target_modules=list(targets), task_type="CAUSAL_LM",
                            base_model_name_or_path=str(model_folder))
    config_dict = {k: v for k, v in config.to_dict().items() if k != "task_type"}
    config_dict["target_modules"] = list(targets)
    h, m = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    io = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
          "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}
    layouts = {t: _layout(config_dict, *io[t]) for t in targets}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for t in targets:
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            for rel, shape in layouts[t].items():
                tensors[f"base_model.model.model.layers.{i}.{part}.{t}.{rel}"] = torch.randn(shape, generator=gen) * 0.01
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    marker.write_text(json.dumps(spec))
    return out
