"""`surgeon finetune`: companion fine-tuning that produces inputs for surgery.

Trains a local safetensors model on a JSONL/CSV task with one of the methods
in :mod:`surgeon.workflows.train.methods` and writes either a complete
model folder (full) or a standard PEFT adapter folder (the classification head
as ``modules_to_save``), each with the tokenizer and ``surgeon_provenance.json``.
Output is built in a scratch folder beside the target and published through
:class:`~surgeon.io.writer.CheckpointWriter` (validated, then renamed into place).
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from surgeon.errors import AdapterError, IncompatibleInputError, NumericalError, OptionError
from surgeon.io.adapter import ADAPTER_CONFIG, Adapter, BaseNames, adapter_layout, is_adapter_folder
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.data import TaskData, load_task_data
from surgeon.io.resolve import resolve_path
from surgeon.io.writer import _STAGING_MARK, CheckpointWriter, TensorSpec, check_output, clean_stale_staging
from surgeon.progress import progress
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text, safetensors_metadata
from surgeon.workflows.train.evaluate import TaskMetrics, causal_metrics, classification_metrics
from surgeon.workflows.train.methods import (
    DEFAULT_RANK, SparseLoRA, check_method_available, default_alpha, default_lr,
)
from surgeon.workflows.train.model import Built, build_model
from surgeon.workflows.train.options import METHODS, FinetuneOptions, Previous
from surgeon.workflows.train.textmodel import (
    PeakMemory, Stopwatch, accepts_token_types, batches, encode_causal, encode_texts, head_modules, is_decoder_config,
    load_tokenizer, pick_device, quiet_transformers, read_model_config, read_provenance, seed_everything,
)

WARMUP_FRACTION = 0.1
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class FinetuneReport:
    base: str
    output: str
    method: str
    task: str
    stage: int
    continue_from: str | None
    rank: int | None
    alpha: float | None
    targets: str | list[str] | None
    target_modules: int
    lr: float
    head_lr: float | None
    epochs: int
    batch_size: int
    seed: int
    device: str
    train_examples: int
    eval_examples: int | None
    labels: list[str] | None
    trainable_parameters: int
    total_parameters: int
    trainable_percent: float
    train_loss: list[float]
    eval_before: dict[str, Any] | None
    eval_per_epoch: list[dict[str, Any]]
    sparsity: float | None
    wall_time_s: float
    peak_memory_bytes: int
    memory_kind: str
    notes: list[str] = field(default_factory=list)

    @property
    def eval(self) -> dict[str, Any] | None:
        return self.eval_per_epoch[-1] if self.eval_per_epoch else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "eval": self.eval}


def _check_options(o: FinetuneOptions) -> None:
    if o.method not in METHODS:
        raise OptionError(f"--method {o.method!r} is unknown; use one of: {', '.join(METHODS)}.")
    numbers = {"--epochs": o.epochs, "--batch-size": o.batch_size, "--rank": o.rank}
    for flag, value in numbers.items():
        if value is not None and value < 1:
            raise OptionError(f"{flag} must be a positive integer (got {value}).")
    if o.max_length < 2:
        raise OptionError(f"--max-length must be at least 2 tokens (got {o.max_length}).")
    if o.lr is not None and not (o.lr > 0 and math.isfinite(o.lr)):
        raise OptionError(f"--lr must be a positive number (got {o.lr}).")
    if o.head_lr is not None and not (o.head_lr > 0 and math.isfinite(o.head_lr)):
        raise OptionError(f"--head-lr must be a positive number (got {o.head_lr}).")
    if o.head_lr is not None and o.task != "classification":
        raise OptionError("--head-lr is the classification head's learning rate; use it with --task classification.")
    if o.method == "full" and (o.rank or o.alpha or o.targets):
        raise OptionError("--rank, --alpha and --targets are for adapter methods; --method full trains every weight.")
    if o.method != "sparse-lora" and (o.l1 is not None or o.sparsity is not None):
        raise OptionError("--l1 and --sparsity apply to --method sparse-lora only.")
    if o.method == "sparse-lora":
        if o.l1 is None and o.sparsity is None:
            raise OptionError("--method sparse-lora needs --l1 LAMBDA and/or --sparsity FRACTION (e.g. --sparsity 0.5).")
        if o.sparsity is not None and not 0.0 <= o.sparsity < 1.0:
            raise OptionError(f"--sparsity is the fraction of zeros in A and B, in [0, 1) (got {o.sparsity}).")
        if o.l1 is not None and o.l1 < 0:
            raise OptionError(f"--l1 must be >= 0 (got {o.l1}).")
    if o.continue_from and o.method != "full" and (o.alpha is not None or o.targets):
        raise OptionError("--alpha and --targets come from the previous stage when continuing an adapter; omit them.")
    if o.method == "hira" and o.alpha is not None:
        raise OptionError("--alpha does not apply to --method hira (HiRA has no scaling factor).")
    check_method_available(o.method)


def _previous(o: FinetuneOptions) -> Previous | None:
    if o.continue_from is None:
        return None
    folder = resolve_path(o.continue_from)
    record = read_provenance(folder)
    params, report = record.get("parameters") or {}, record.get("report") or {}
    prev = Previous(folder, is_adapter_folder(folder), params.get("method"),
                    report.get("labels"), int(report.get("stage") or 1))
    if o.method == "full" and prev.is_adapter:
        raise IncompatibleInputError(f"{folder}: is an adapter; continue it with its adapter method, not --method full.")
    if o.method != "full" and not prev.is_adapter:
        raise IncompatibleInputError(f"{folder}: is a full model; continue a full fine-tune with --method full.")
    if prev.method and prev.method != o.method:
        raise IncompatibleInputError(f"{folder}: was trained with --method {prev.method}; continue it with the same method.")
    if prev.is_adapter:
        with Adapter.open(folder) as adapter:
            if o.rank is not None and adapter.config.r not in (o.rank, 2 * o.rank):
                raise IncompatibleInputError(f"{folder}: has rank {adapter.config.r}; --rank {o.rank} cannot continue it (omit --rank).")
    return prev


def _check_same_architecture(folder: Path, base: Path) -> None:
    """An adapter of another architecture: say so (not peft's warning and a hint at --targets)."""
    with Adapter.open(folder) as adapter, Checkpoint.open(base) as ckpt:
        names = BaseNames(ckpt.keys())
        modules = sorted(adapter_layout(adapter.weights).modules)
        missing = [m for m in modules if names.resolve(f"{m}.weight", what=str(folder)) is None]
    if missing:
        raise IncompatibleInputError(
            f"{folder}: {len(missing)} of the {len(modules)} modules it adapts are not in {base} (e.g. {missing[0]!r}): "
            "it was trained on another architecture. Continue from an adapter of this base, or give the base it "
            "was trained on.")


def _resolved(o: FinetuneOptions) -> FinetuneOptions:
    if o.method == "full":
        return replace(o, lr=o.lr or default_lr(o.method))
    rank = o.rank or DEFAULT_RANK
    alpha = None if o.method == "hira" else (o.alpha if o.alpha is not None else default_alpha(rank))
    return replace(o, rank=rank, alpha=alpha, lr=o.lr or default_lr(o.method))


def finetune(options: FinetuneOptions) -> FinetuneReport:
    """Train, evaluate and write one fine-tune (or one stage of a sequence); returns its report."""
    _check_options(options)
    o = _resolved(options)
    quiet_transformers()
    base = resolve_path(o.base)
    config = read_model_config(base)
    if o.task == "causal-lm" and not is_decoder_config(config):
        raise IncompatibleInputError(f"{base}: is an encoder ({config.get('model_type')}); --task causal-lm needs a decoder model (GPT-2, Llama, ...).")
    prev = _previous(options)  # before defaults: an omitted --rank means "the previous stage's"
    if prev is not None and prev.is_adapter:
        _check_same_architecture(prev.folder, base)
    out = Path(o.out)
    inputs = [base, Path(o.data)] + ([Path(o.eval_data)] if o.eval_data else []) + ([prev.folder] if prev else [])
    check_output(out, inputs, overwrite=o.overwrite)
    train = load_task_data(o.data, o.task)
    evald = load_task_data(o.eval_data, o.task, labels=train.labels) if o.eval_data else None
    device = pick_device(o.device)
    tokenizer = load_tokenizer(*([prev.folder] if prev else []), base)
    clean_stale_staging(out.resolve().parent)
    scratch = out.resolve().parent / f".{out.name}{_STAGING_MARK}{os.getpid()}-scratch{secrets.token_hex(3)}"
    try:  # made inside the try: a signal right after the mkdir still removes it
        scratch.mkdir()
        return _run(o, base, prev, train, evald, tokenizer, device, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(o: FinetuneOptions, base: Path, prev: Previous | None, train: TaskData, evald: TaskData | None,
         tokenizer: Any, device: torch.device, scratch: Path) -> FinetuneReport:
    clock = Stopwatch()
    seed_everything(o.seed)
    with PeakMemory(device) as memory:
        built = build_model(o, base, prev, train.labels, tokenizer, device, scratch)
        evaluate = _evaluator(o, built.model, tokenizer, evald, train.labels, device)
        before = evaluate()
        losses, per_epoch, sparsity = _train(o, built, tokenizer, train, evaluate, device)
        folder, extra = built.save(scratch / "out", tokenizer)
    trainable, total = built.parameter_counts
    report = FinetuneReport(
        base=o.base, output=o.out, method=o.method, task=o.task, stage=prev.stage + 1 if prev else 1,
        continue_from=o.continue_from, rank=built.rank, alpha=built.alpha, targets=built.targets,
        target_modules=built.target_modules, lr=float(o.lr or 0), head_lr=o.head_lr, epochs=o.epochs, batch_size=o.batch_size,
        seed=o.seed, device=str(device), train_examples=len(train), eval_examples=len(evald) if evald else None,
        labels=list(train.labels) if train.labels else None, trainable_parameters=trainable,
        total_parameters=total, trainable_percent=100.0 * trainable / max(total, 1), train_loss=losses,
        eval_before=before.to_dict() if before else None, eval_per_epoch=[m.to_dict() for m in per_epoch],
        sparsity=sparsity, wall_time_s=clock.seconds, peak_memory_bytes=memory.peak_bytes,
        memory_kind=memory.kind, notes=built.notes,
    )
    _publish(o, folder, extra, report, prev, base)
    return report


def _evaluator(o: FinetuneOptions, model: Any, tokenizer: Any, evald: TaskData | None, labels: Any,
               device: torch.device) -> Any:
    def evaluate() -> TaskMetrics | None:
        if evald is None:
            return None
        sizes = dict(batch_size=o.batch_size, max_length=o.max_length, device=device)
        if o.task == "classification":
            return classification_metrics(model, tokenizer, evald, list(labels), **sizes)
        return causal_metrics(model, tokenizer, evald, **sizes)
    return evaluate


def _lr_lambda(total: int) -> Any:
    warmup = max(1, int(WARMUP_FRACTION * total))

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return scale


def _param_groups(model: Any, params: list[torch.nn.Parameter], o: FinetuneOptions) -> list[dict[str, Any]]:
    """One group at ``lr``; with ``head_lr`` the trainable parameters of the task head in a second group
    (the body's group first: sparse LoRA reads its step from group 0)."""
    if o.head_lr is None:
        return [{"params": params}]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = {id(p) for name in head_modules(inner) for p in getattr(inner, name).parameters() if p.requires_grad}
    body, tuned_head = [p for p in params if id(p) not in head], [p for p in params if id(p) in head]
    return ([{"params": body}] if body else []) + ([{"params": tuned_head, "lr": o.head_lr}] if tuned_head else [])


def _train(o: FinetuneOptions, built: Built, tokenizer: Any, train: TaskData, evaluate: Any,
           device: torch.device) -> tuple[list[float], list[TaskMetrics], float | None]:
    """AdamW with linear warmup/decay; per-epoch mean train loss and eval metrics."""
    model = built.model
    if o.task == "classification":
        enc = encode_texts(tokenizer, train.texts, train.label_ids(train.labels or ()), o.max_length,
                           token_types=accepts_token_types(model))
    else:
        enc = encode_causal(tokenizer, train.examples, o.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = math.ceil(len(train) / o.batch_size)
    optimizer = torch.optim.AdamW(_param_groups(model, params, o), lr=o.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps * o.epochs))
    sparse = SparseLoRA(model, l1=o.l1, sparsity=o.sparsity, epochs=o.epochs) if o.method == "sparse-lora" else None
    losses, per_epoch = [], []
    for epoch in range(o.epochs):
        model.train()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(o.seed * 1000 + epoch)).tolist()
        total, weight = 0.0, 0
        for batch in progress(batches(enc, order, batch_size=o.batch_size, pad_id=tokenizer.pad_token_id, device=device),
                              total=steps, desc=f"epoch {epoch + 1}/{o.epochs}", unit="batch"):
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise NumericalError(f"training diverged (loss {float(loss.detach())}) in epoch {epoch + 1}; lower --lr (now {o.lr}).")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if sparse is not None:
                sparse.after_step(lr_now)
            count = int((batch["labels"] != -100).sum()) if o.task == "causal-lm" else len(batch["labels"])
            total += float(loss.detach()) * count
            weight += count
        if sparse is not None:
            sparse.end_epoch(epoch)
        losses.append(total / max(weight, 1))
        metrics = evaluate()
        if metrics is not None:
            per_epoch.append(metrics)
    return losses, per_epoch, sparse.achieved() if sparse is not None else None


def _publish(o: FinetuneOptions, folder: Path, extra: dict[str, torch.Tensor], report: FinetuneReport,
             prev: Previous | None, base: Path) -> None:
    """Copy the scratch output through CheckpointWriter (validated, renamed into place) with provenance."""
    prefix = "model" if o.method == "full" else "adapter_model"
    params = {k: v for k, v in asdict(o).items() if k not in ("base", "data", "out", "eval_data", "continue_from", "overwrite")}
    inputs = {"base": o.base, "data": o.data, **({"eval": o.eval_data} if o.eval_data else {}),
              **({"continue_from": o.continue_from} if o.continue_from else {})}
    record = provenance("finetune", params, inputs=inputs)
    with Checkpoint.open(folder, prefix=prefix) as ckpt:
        specs = [TensorSpec(n, ckpt.info(n).dtype, ckpt.info(n).shape) for n in ckpt.keys()]
        specs += [TensorSpec(n, "F32", tuple(t.shape)) for n, t in extra.items()]
        sidecars = ckpt.extra_files()
        with CheckpointWriter(o.out, specs, inputs=[base] + ([prev.folder] if prev else []), prefix=prefix,
                              metadata=safetensors_metadata(record), extra_files=sidecars,
                              extra_texts={PROVENANCE_FILE: provenance_file_text(record, report.to_dict())},
                              overwrite=o.overwrite) as writer:
            for name in progress(ckpt.keys(), total=len(ckpt), desc="write"):
                writer.copy_from(ckpt, name)
            for name, tensor in extra.items():
                writer.write(name, tensor.detach().to("cpu", torch.float32).contiguous())
    if prefix == "adapter_model" and not (Path(o.out) / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{o.out}: peft wrote no {ADAPTER_CONFIG}; this is a bug, please report it.")
