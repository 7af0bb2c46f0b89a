"""Benchmark inputs: a Llama-shaped checkpoint of ~1.1B parameters and a LoRA for it.

Shapes follow TinyLlama-1.1B (hidden 2048, MLP 5632, 22 layers, 32 heads, 4 KV
heads, vocab 32000). Weights are random (we time IO and math, not quality) and
written with surgeon's own streaming writer, so building never holds the
model in memory. Builds are cached: a folder whose ``bench_spec.json``
matches is reused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from surgeon.io.format import st_dtype
from surgeon.io.writer import CheckpointWriter, TensorSpec

FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_dims(scale: float = 1.0) -> dict[str, int]:
    """TinyLlama dims with layers and vocab scaled (scale 0.5 ~ half the parameters)."""
    dims = dict(FULL)
    dims["num_hidden_layers"] = max(1, round(FULL["num_hidden_layers"] * scale))
    dims["vocab_size"] = max(256, round(FULL["vocab_size"] * scale))
    return dims


def _tensor_shapes(d: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    h, m, v = d["hidden_size"], d["intermediate_size"], d["vocab_size"]
    kv = h // d["num_attention_heads"] * d["num_key_value_heads"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (m, h)),
            (p + "mlp.up_proj.weight", (m, h)),
            (p + "mlp.down_proj.weight", (h, m)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return shapes


def _config(d: dict[str, int], dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **d,
        "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, "attention_bias": False,
    }


def build_llama_checkpoint(folder: str | Path, *, scale: float = 1.0, dtype: torch.dtype = torch.bfloat16,
                           shards: int = 3, seed: int = 0) -> Path:
    """Write (or reuse) a random Llama-shaped checkpoint in ``shards`` files."""
    folder = Path(folder)
    d = llama_dims(scale)
    spec = {"dims": d, "dtype": str(dtype), "shards": shards, "seed": seed, "layout": 2}
    marker = folder / "bench_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    shapes = _tensor_shapes(d)
    specs = [TensorSpec(n, st_dtype(dtype), s) for n, s in shapes]
    total = sum(s.nbytes for s in specs)
    gen = torch.Generator().manual_seed(seed)
    with CheckpointWriter(folder, specs, max_shard_size=-(-total // shards) + max(s.nbytes for s in specs),
                          extra_texts={"config.json": json.dumps(_config(d, dtype), indent=2)},
                          overwrite=True) as writer:
        for name, shape in shapes:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen).mul_(0.02)
            writer.write(name, t.to(dtype))
    marker.write_text(json.dumps(spec))
    return folder


def build_lora_adapter(model_folder: str | Path, out_folder: str | Path, *, rank: int = 16, alpha: float = 32.0,
                       targets: tuple[str, ...] = LORA_TARGETS, seed: int = 1) -> Path:
    """Write a PEFT LoRA adapter folder (float32, as peft saves) for a Llama-shaped checkpoint."""
    model_folder, out = Path(model_folder), Path(out_folder)
    cfg = json.loads((model_folder / "config.json").read_text())
    spec = {"model": str(model_folder.resolve()), "rank": rank, "alpha": alpha, "targets": list(targets), "seed": seed,
            "layers": cfg["num_hidden_layers"]}
    marker = out / "bench_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    h, m = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    io = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
          "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for t in targets:
            part = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            fan_in, fan_out = io[t]
            key = f"base_model.model.model.layers.{i}.{part}.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.01
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_folder),
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": list(targets),
        "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True, "revision": None, "layers_to_transform": None, "layers_pattern": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    marker.write_text(json.dumps(spec))
    return out
