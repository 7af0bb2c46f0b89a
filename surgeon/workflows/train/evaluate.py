"""`surgeon eval`: task skill and forgetting of a model or base + adapter.

- classification: accuracy and mean cross-entropy with the trained head;
- causal-lm: mean token loss and perplexity exp(loss) over completion tokens
  (decoders), or masked-LM loss over a fixed 15% of tokens (encoders with an
  MLM head);
- drift: mean cosine between the model's and the base's sentence embeddings
  (mean-pooled last hidden states) on the same texts, a forgetting measure for
  encoders without an LM head.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from surgeon.errors import AdapterError, CheckpointFormatError, NumericalError, OptionError
from surgeon.io.adapter import Adapter, is_adapter_folder
from surgeon.io.data import load_task_data
from surgeon.io.resolve import resolve_path
from surgeon.workflows.train.head import (
    HEAD_MODULES, HeadSource, HeadTensors, check_labels, install_head, normalize, read_head, refuse_own_head,
)
from surgeon.workflows.train.metrics import (  # noqa: F401 - re-exported: finetune and the demo import them here
    MASK_FRACTION, TaskMetrics, causal_metrics, classification_metrics, mask_tokens, masked_lm_metrics,
    sentence_embeddings,
)
from surgeon.workflows.train.textmodel import (
    TOKENIZER_FILES, Stopwatch, is_decoder_config, load_task_model, load_tokenizer, pick_device, quiet_transformers,
    read_model_config, read_provenance,
)

_HEAD_SUFFIXES = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


@dataclass(frozen=True)
class DriftReport:
    """Cosine between the model's and the base's mean-pooled embeddings of each text (1.0 = unchanged)."""

    base: str
    texts: int
    mean_cosine: float
    min_cosine: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EvalReport:
    model: str
    adapter: str | None
    data: str
    task: str | None
    device: str
    metrics: TaskMetrics | None
    drift: DriftReport | None
    labels: list[str] | None
    wall_time_s: float
    tokenizer: str | None = None  # the folder whose tokenizer was used
    head: HeadSource | None = None  # the classification head used (classification only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the workflow ---------------------------------------------------------------------------------

def trained_labels(model_path: Path, adapter_path: Path | None, config: dict[str, Any],
                   head: HeadTensors | None = None) -> list[str]:
    """The label names a classifier was trained with (surgeon provenance, config id2label, or head size);
    with ``head`` (``--head-from``) the head's, checked against the adapter's recorded labels."""
    if head is not None:
        refuse_own_head(model_path)
    if adapter_path is not None:
        report = read_provenance(adapter_path).get("report") or {}
        recorded = [str(x) for x in report["labels"]] if report.get("labels") else None
        with Adapter.open(adapter_path) as adapter:
            own = [k for k in adapter.weights.keys() if normalize(k) is not None]
            outputs = [k for k in own if k.endswith(_HEAD_SUFFIXES)]
            rows = adapter.weights.info(outputs[0]).shape[0] if outputs else None
        if head is not None:
            if own:
                raise AdapterError(
                    f"{adapter_path}: holds its own trained head ({', '.join(own[:2])}); --head-from is for an "
                    "adapter without one: drop --head-from to use the adapter's head.")
            return check_labels(head, adapter_path, recorded)
        if recorded and own:
            return recorded
        if rows is not None:
            return [str(i) for i in range(rows)]
        raise AdapterError(
            f"{adapter_path}: holds no classification head (modules_to_save); give the head it was trained with "
            "by --head-from PATH (the fine-tune, or a file with its classifier.*/score.* tensors), or measure "
            "--task causal-lm or --drift-from."
        )
    if head is not None:
        return head.labels
    id2label = config.get("id2label") or {}
    if not id2label:
        raise CheckpointFormatError(f"{model_path}: config.json has no id2label, so it is not a trained classifier; "
                                    "give its head with --head-from PATH (the fine-tuned model or adapter).")
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def load_for_eval(model_path: Path, adapter_path: Path | None, kind: str, *, labels: list[str] | None,
                  device: torch.device, pad_token_id: int | None, head: HeadTensors | None = None,
                  any_head: bool = False) -> Any:
    """The model (plus adapter, unmerged) ready to evaluate; refuses randomly initialized heads.

    ``head``: copied into the fresh head before the adapter wraps the model (``--head-from``);
    ``any_head``: the head does not matter (embedding drift), a fresh one is fine."""
    model, fresh = load_task_model(model_path, kind, labels=labels, device=device, kind=kind, pad_token_id=pad_token_id)
    fresh = [m for m in fresh if ".pooler" not in f".{m}" or kind != "encoder"]
    is_head = [m for m in fresh if m.split(".", 1)[0] in HEAD_MODULES]
    if head is not None:
        if not is_head:
            raise CheckpointFormatError(
                f"{model_path}: already has a trained classification head; --head-from is for a bare base or a "
                "merged model without one: drop --head-from to use its own head.")
        install_head(model, head, model_path=model_path)
    if head is not None or any_head:
        fresh = [m for m in fresh if m not in is_head]
    saved: list[str] = []
    if adapter_path is not None:
        from peft import PeftConfig, PeftModel

        with Adapter.open(adapter_path) as opened:
            saved = list(opened.config.modules_to_save or [])
            headless = not any(normalize(k) is not None for k in opened.weights.keys())
        try:
            extra: dict[str, Any] = {}
            if headless and (head is not None or any_head):  # a plain PeftModel: peft's SEQ_CLS wrapper would demand the head's tensors
                extra["config"] = PeftConfig.from_pretrained(str(adapter_path))
                extra["config"].task_type = None
                extra["config"].modules_to_save = [m for m in saved if m not in HEAD_MODULES] or None
            model = PeftModel.from_pretrained(model, str(adapter_path), **extra)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise AdapterError(
                f"{adapter_path}: does not fit {model_path} ({str(exc).splitlines()[0]}); give the base it was trained on."
            ) from None
        model.to(device)
    uncovered = [m for m in fresh if not any(m == s or m.endswith("." + s) or m.startswith(s + ".") for s in saved)]
    uncovered = [m for m in uncovered if not any(m.startswith(other + ".") for other in uncovered)]
    if uncovered:
        what = {"classification": "classification head", "masked-lm": "masked-LM head"}.get(kind, "weights")
        hint = {"classification": "give a model fine-tuned with --task classification or its adapter with --adapter",
                "masked-lm": "for an encoder without an LM head measure forgetting with --drift-from BASE"}.get(
                    kind, "give a complete model folder")
        raise CheckpointFormatError(
            f"{adapter_path or model_path}: has no trained {what} ({', '.join(uncovered[:3])} would be random); {hint}."
        )
    _refuse_non_finite_weights(model, model_path, adapter_path)
    model.eval()
    return model


def _refuse_non_finite_weights(model: Any, model_path: Path, adapter_path: Path | None) -> None:
    """NaN/Inf in a weight can still give finite-looking logits (attention swallows some), so a metric
    of such a model would be quietly wrong: one line naming the weight instead."""
    from surgeon.ops.finite import non_finite_count

    for name, param in model.named_parameters():
        bad = non_finite_count(param.detach())
        if bad:
            source = adapter_path if adapter_path is not None and ("lora_" in name or "modules_to_save" in name) \
                else model_path
            raise NumericalError(f"{source}: weight {name!r} holds {bad} NaN/Inf value(s) of {param.numel()}; the "
                                 "checkpoint is corrupt or its training diverged: re-download or re-train it.")


def _split_model_arg(model: str | os.PathLike[str], adapter: str | os.PathLike[str] | None) -> tuple[Path, Path | None]:
    """MODEL may itself be an adapter folder whose base_model_name_or_path exists locally."""
    model_path = resolve_path(model)
    adapter_path = resolve_path(adapter) if adapter is not None else None
    if adapter_path is None and is_adapter_folder(model_path):
        with Adapter.open(model_path) as opened:
            base = opened.config.base_model
        if not base or not Path(base).exists():
            raise AdapterError(
                f"{model_path}: is an adapter whose base ({base or 'not recorded'}) is not a local folder; "
                "pass the base as MODEL and the adapter with --adapter."
            )
        return Path(base), model_path
    return model_path, adapter_path


def evaluate(
    model: str | os.PathLike[str], *, data: str | os.PathLike[str], task: str | None = None,
    adapter: str | os.PathLike[str] | None = None, drift_from: str | os.PathLike[str] | None = None,
    batch_size: int = 32, max_length: int = 128, device: str = "auto", seed: int = 0,
    tokenizer: str | os.PathLike[str] | None = None, head_from: str | os.PathLike[str] | None = None,
) -> EvalReport:
    """Measure ``task`` skill on ``data`` and/or embedding drift from ``drift_from``.

    ``tokenizer``: a folder whose tokenizer to use; by default the adapter's, MODEL's, else
    ``drift_from``'s (the report's ``tokenizer`` says which). ``head_from``: a checkpoint whose
    classification head to use with a model or adapter that has none (the report's ``head`` says
    which head was used)."""
    if task is None and drift_from is None:
        raise OptionError("nothing to measure; give --task classification|causal-lm, --drift-from BASE, or both.")
    if head_from is not None and task != "classification":
        raise OptionError("--head-from gives a classification head; use it with --task classification.")
    if batch_size < 1 or max_length < 2:
        raise OptionError(f"--batch-size must be >= 1 and --max-length >= 2 (got {batch_size}, {max_length}).")
    quiet_transformers()
    clock = Stopwatch()
    model_path, adapter_path = _split_model_arg(model, adapter)
    config = read_model_config(model_path)
    dev = pick_device(device)
    tokenizer, tokenizer_from = _eval_tokenizer(tokenizer, adapter_path, model_path, drift_from)
    sizes = dict(batch_size=batch_size, max_length=max_length, device=dev)
    metrics, labels, used = None, None, None
    if task == "classification":
        head = read_head(head_from) if head_from is not None else None
        labels = trained_labels(model_path, adapter_path, config, head)
        dataset = load_task_data(data, task, labels=labels)
        net = load_for_eval(model_path, adapter_path, task, labels=labels, device=dev, pad_token_id=tokenizer.pad_token_id,
                            head=head)
        used = _head_source(net, head, model_path, adapter_path, labels)
        metrics = classification_metrics(net, tokenizer, dataset, labels, **sizes)
    elif task is not None:
        dataset = load_task_data(data, task)
        kind = "causal-lm" if is_decoder_config(config) else "masked-lm"
        net = load_for_eval(model_path, adapter_path, kind, labels=None, device=dev, pad_token_id=tokenizer.pad_token_id)
        metrics = (causal_metrics(net, tokenizer, dataset, **sizes) if kind == "causal-lm"
                   else masked_lm_metrics(net, tokenizer, dataset, seed=seed, **sizes))
    drift = None
    if drift_from is not None:
        drift = embedding_drift(model_path, adapter_path, drift_from, data=data, config=config, tokenizer=tokenizer, **sizes)
    return EvalReport(str(model), str(adapter) if adapter else None, str(data), task, str(dev), metrics, drift,
                      labels, clock.seconds, tokenizer_from, used)


def _head_source(net: Any, head: HeadTensors | None, model_path: Path, adapter_path: Path | None,
                 labels: list[str]) -> HeadSource:
    """Which head the classification eval uses: ``--head-from``'s, the adapter's (modules_to_save) or MODEL's."""
    names = sorted({n for key, _ in net.named_parameters() if (n := normalize(key)) is not None})
    if head is not None:
        return HeadSource(str(head.source), "head-from", names, labels)
    trained = any("modules_to_save" in key for key, _ in net.named_parameters())
    if adapter_path is not None and trained:
        return HeadSource(str(adapter_path), "adapter", names, labels)
    return HeadSource(str(model_path), "model", names, labels)


def _eval_tokenizer(explicit: str | os.PathLike[str] | None, adapter_path: Path | None, model_path: Path,
                    drift_from: str | os.PathLike[str] | None) -> tuple[Any, str]:
    """(tokenizer, the folder it came from): ``--tokenizer``, else the adapter's, MODEL's, ``--drift-from``'s."""
    if explicit is not None:
        folder = resolve_path(explicit)
        return load_tokenizer(folder), str(folder)
    folders = [p for p in (adapter_path, model_path) if p is not None]
    folders += [resolve_path(drift_from)] if drift_from is not None else []
    for folder in folders:
        if folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES):
            return load_tokenizer(folder), str(folder)
    raise CheckpointFormatError(
        f"{', '.join(str(f) for f in folders)}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); "
        "pass --tokenizer PATH (the base model's folder) or copy its tokenizer files into the model folder.")


@dataclass(frozen=True)
class EvalManyReport:
    """One :class:`EvalReport` per data file, in the order given (`surgeon eval --data A --data B`)."""

    model: str
    adapter: str | None
    reports: list[EvalReport]
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "adapter": self.adapter, "reports": [r.to_dict() for r in self.reports],
                "wall_time_s": self.wall_time_s}


def evaluate_many(model: str | os.PathLike[str], *, data: list[str | os.PathLike[str]], **options: Any) -> EvalManyReport:
    """:func:`evaluate` on each file of ``data`` (one per task), same model and options."""
    if not data:
        raise OptionError("no data: give --data FILE (once per task).")
    clock = Stopwatch()
    reports = [evaluate(model, data=d, **options) for d in data]
    adapter = options.get("adapter")
    return EvalManyReport(str(model), str(adapter) if adapter else None, reports, clock.seconds)


def _encoder_kind(adapter_path: Path | None, config: dict[str, Any]) -> tuple[str, list[str] | None]:
    """Which head to load so that an adapter's weights find their modules (it is merged away after)."""
    if adapter_path is None:
        return "encoder", None
    with Adapter.open(adapter_path) as opened:
        task_type = opened.config.raw.get("task_type")
    if task_type == "SEQ_CLS":  # the head is merged away unused: a headless adapter's fresh one is fine
        try:
            return "classification", trained_labels(Path(), adapter_path, config)
        except AdapterError:
            return "classification", ["0", "1"]
    if task_type == "CAUSAL_LM":
        return "causal-lm", None
    return "encoder", None


def embedding_drift(model_path: Path, adapter_path: Path | None, base: str | os.PathLike[str], *,
                    data: str | os.PathLike[str], config: dict[str, Any], tokenizer: Any, batch_size: int,
                    max_length: int, device: torch.device) -> DriftReport:
    """Mean and min cosine between the model's and the base's sentence embeddings of the texts in ``data``."""
    base_path = resolve_path(base)
    read_model_config(base_path)
    texts = load_task_data(data, "causal-lm").texts
    kind, labels = _encoder_kind(adapter_path, config)
    net = load_for_eval(model_path, adapter_path, kind, labels=labels, device=device, pad_token_id=tokenizer.pad_token_id,
                        any_head=True)
    if adapter_path is not None:
        net = net.merge_and_unload()
    sizes = dict(batch_size=batch_size, max_length=max_length, device=device)
    tuned = sentence_embeddings(net, tokenizer, texts, **sizes)
    del net
    reference = load_for_eval(base_path, None, "encoder", labels=None, device=device, pad_token_id=tokenizer.pad_token_id)
    original = sentence_embeddings(reference, tokenizer, texts, **sizes)
    if tuned.shape != original.shape:
        raise CheckpointFormatError(
            f"{base_path}: its embeddings are {tuple(original.shape)[1]}-dimensional but the model's are "
            f"{tuple(tuned.shape)[1]}; --drift-from needs the model's own base."
        )
    cos = F.cosine_similarity(tuned.double(), original.double(), dim=-1)
    return DriftReport(str(base), len(texts), float(cos.mean()), float(cos.min()))
