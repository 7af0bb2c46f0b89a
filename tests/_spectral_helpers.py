"""Shared by the spectral tests: real peft LoRAs trained a few steps, planted intruders, and the
dense reference (full ``torch.linalg.svd`` of base and tuned in float64, the authors' method)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def train_lora(model_folder: Path, out: Path, *, kind: str, targets: list[str], r: int = 4, alpha: int = 8,
               steps: int = 12, lr: float = 0.05, seed: int = 0, **lora_kw) -> Path:
    """Train a peft LoRA on random data for a few steps (big steps, so intruders appear) and save it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if kind == "causal":
        model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
        task = "CAUSAL_LM"
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_folder, dtype=torch.float32)
        task = "SEQ_CLS"
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type=task, **lora_kw)
    peft_model = get_peft_model(model, config)
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    vocab = model.config.vocab_size
    for _ in range(steps):
        ids = torch.randint(0, vocab, (8, 12))
        if kind == "causal":
            loss = peft_model(input_ids=ids, labels=ids).loss
        else:
            loss = peft_model(input_ids=ids, labels=torch.randint(0, 2, (8,))).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def merged_state(model_folder: Path, adapter: Path, *, kind: str,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """peft's own merge_and_unload() as a state dict (the reference tuned weights). float32: what a merged
    checkpoint holds; float64: W₀ + s·BA exactly as surgeon forms it from BASE + adapter (a float32 merge's
    rounding moves the cosines of a nearly repeated singular pair by ~1e-5, and the trained adapter differs
    with the CPU's BLAS kernels, so only a float64 reference is a tight one on every machine)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    model = PeftModel.from_pretrained(cls.from_pretrained(model_folder, dtype=dtype), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def reference_cosines(w0: torch.Tensor, wt: torch.Tensor, k: int, side: str = "left"
                      ) -> tuple[list[float], torch.Tensor]:
    """(c_j for the top-k tuned vectors, σ_t) from full float64 SVDs of both (the authors' method)."""
    u0, _, v0h = torch.linalg.svd(w0.double(), full_matrices=False)
    ut, st, vth = torch.linalg.svd(wt.double(), full_matrices=False)
    if side == "left":
        c = (ut[:, :k].T @ u0).abs().max(dim=1).values
    else:
        c = (vth[:k] @ v0h.T).abs().max(dim=1).values
    return [float(x) for x in c], st


def geometric_matrix(m: int, n: int, *, decay: float = 0.9, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """U·diag(scale·decay^i)·Vᵀ with random orthogonal U, V: a well-separated spectrum (float64)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = scale * decay ** torch.arange(k, dtype=torch.float64)
    return (u * s) @ v.T


def plant(w0: torch.Tensor, sigmas: list[float], *, seed: int = 1) -> torch.Tensor:
    """W₀ + Σ σ_j a_j b_jᵀ with random unit a_j, b_j."""
    gen = torch.Generator().manual_seed(seed)
    out = w0.clone()
    for s in sigmas:
        a = torch.nn.functional.normalize(torch.randn(w0.shape[0], generator=gen, dtype=w0.dtype), dim=0)
        b = torch.nn.functional.normalize(torch.randn(w0.shape[1], generator=gen, dtype=w0.dtype), dim=0)
        out += s * torch.outer(a, b)
    return out


def save_matrices(path: Path, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    return path


# -- session fixtures (import them into a test module to use them) -----------------------------------
import pytest  # noqa: E402

LLAMA_TARGETS = ["q_proj", "v_proj", "k_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="session")
def llama_lora(tiny_llama, tmp_path_factory) -> Path:
    """A peft LoRA (r=4) on 5 Llama projections, trained 12 big steps on random tokens."""
    return train_lora(tiny_llama, tmp_path_factory.mktemp("llama_lora"), kind="causal", targets=LLAMA_TARGETS)


@pytest.fixture(scope="session")
def bert_lora(tiny_bert, tmp_path_factory) -> Path:
    """A peft LoRA on BERT query/value/intermediate (classifier in modules_to_save), trained a few steps."""
    return train_lora(tiny_bert, tmp_path_factory.mktemp("bert_lora"), kind="seqcls",
                      targets=["query", "value", "intermediate.dense"])


@pytest.fixture(scope="session")
def gpt2_lora(tiny_gpt2, tmp_path_factory) -> Path:
    """A peft LoRA on GPT-2's Conv1D c_attn and c_fc (fan_in_fan_out), trained a few steps."""
    return train_lora(tiny_gpt2, tmp_path_factory.mktemp("gpt2_lora"), kind="causal", targets=["c_attn", "c_fc"],
                      fan_in_fan_out=True)


def save_merged(model_folder: Path, adapter: Path, out: Path, *, kind: str) -> Path:
    """peft's merge_and_unload() of ``adapter`` saved as a checkpoint folder (float32, the base's names)."""
    from surgeon.io.checkpoint import Checkpoint

    state = merged_state(model_folder, adapter, kind=kind)
    with Checkpoint.open(model_folder) as base:
        names = base.keys()
    out.mkdir(parents=True, exist_ok=True)
    save_matrices(out / "model.safetensors", {n: state[n] for n in names if n in state})
    (out / "config.json").write_text((model_folder / "config.json").read_text())
    return out
