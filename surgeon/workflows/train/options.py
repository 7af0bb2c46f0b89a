"""What a `surgeon finetune` run is asked to do, and the earlier stage it continues (shared by `finetune` and `model`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# `surgeon finetune --method` (what each one is: surgeon.workflows.train.methods)
METHODS = ("full", "lora", "dora", "rslora", "pissa", "sparse-lora", "hira", "qlora")


@dataclass(frozen=True)
class FinetuneOptions:
    """Everything one `surgeon finetune` run needs (None: the method's default)."""

    base: str
    data: str
    out: str
    task: str = "classification"
    method: str = "lora"
    eval_data: str | None = None
    rank: int | None = None
    alpha: float | None = None
    targets: str | None = None
    lr: float | None = None
    head_lr: float | None = None  # the classification head's peak learning rate (None: lr)
    epochs: int = 3
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    device: str = "auto"
    l1: float | None = None
    sparsity: float | None = None
    continue_from: str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class Previous:
    """A previous stage of continual fine-tuning (a surgeon finetune output)."""

    folder: Path
    is_adapter: bool
    method: str | None
    labels: list[str] | None
    stage: int
