"""The stages of `surgeon demo`, each a call into one surgeon workflow.

Every stage reads what earlier stages left in ``run.paths`` / ``run.results``
and adds its own; ``run.results`` becomes ``demo.json``. Numbers are copied
from the workflows' reports, never recomputed here.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from surgeon.errors import CheckpointFormatError, DataError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.data import load_task_data
from surgeon.io.writer import CheckpointWriter, TensorSpec
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text, safetensors_metadata

if TYPE_CHECKING:
    from surgeon.workflows.demo.settings import DemoRun

DATA_FILES = ("train.jsonl", "test.jsonl", "probe.jsonl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
HEAD = "classifier"
# The task is sentiment; forgetting is measured on sentences of other domains (the topic set's texts).
PACKAGED = {"train": "sentiment_train.jsonl", "test": "sentiment_eval.jsonl", "probe": "topic_train.jsonl"}


# -- setup -----------------------------------------------------------------------------------------
def data_files(folder: Path | None) -> dict[str, Path]:
    """train / test / probe files: from ``folder`` when given, else the set shipped with surgeon."""
    if folder is None:
        from surgeon.io.embedded import data_file

        return {key: data_file(name) for key, name in PACKAGED.items()}
    found = {name.split(".")[0]: folder / name for name in DATA_FILES}
    missing = [str(p) for p in found.values() if not p.is_file()]
    if missing:
        raise DataError(f"{folder}: demo data needs {', '.join(DATA_FILES)}; missing {', '.join(missing)}.")
    return found


def write_task_base(source: Path, out: Path, labels: list[str], *, seed: int) -> dict[str, Any]:
    """``source`` (a bare encoder such as BertModel) laid out as a sequence classifier in ``out``.

    The encoder's tensors are copied byte for byte under the task model's prefix
    (``bert.``); the head (``classifier.weight``: labels x hidden, float32) is
    drawn from N(0, initializer_range) with ``seed`` and the bias is zero. This is
    the "before" model every fine-tune starts from and every diff compares with.
    """
    with Checkpoint.open(source) as ckpt:
        config = dict(ckpt.config() or {})
        names = ckpt.keys()
        if config.get("model_type") != "bert" or "hidden_size" not in config or any(n.startswith("bert.") for n in names):
            raise CheckpointFormatError(
                f"{source}: the demo needs a bare BERT encoder (BertModel, like all-MiniLM-L6-v2) with config.json; "
                f"found model_type {config.get('model_type')!r}. Pass a BertModel folder as the model.")
        hidden = int(config["hidden_size"])
        gen = torch.Generator().manual_seed(seed)
        head = {f"{HEAD}.weight": torch.randn(len(labels), hidden, generator=gen) * float(config.get("initializer_range", 0.02)),
                f"{HEAD}.bias": torch.zeros(len(labels))}
        specs = [TensorSpec(f"bert.{n}", ckpt.info(n).dtype, ckpt.info(n).shape) for n in names]
        specs += [TensorSpec(n, "F32", tuple(t.shape)) for n, t in head.items()]
        config.update(architectures=["BertForSequenceClassification"], id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)})
        record = provenance("demo", {"stage": "task-base", "labels": labels, "seed": seed}, inputs={"base": str(source)})
        sidecars = [p for p in ckpt.extra_files() if p.name in TOKENIZER_FILES]
        with CheckpointWriter(out, specs, inputs=[source], metadata=safetensors_metadata(record), extra_files=sidecars,
                              extra_texts={"config.json": json.dumps(config, indent=2) + "\n",
                                           PROVENANCE_FILE: provenance_file_text(record)}) as writer:
            for n in names:
                writer.copy_from(ckpt, n, as_name=f"bert.{n}")
            for n, t in head.items():
                writer.write(n, t)
        return {"parameters": sum(ckpt.info(n).numel for n in ckpt.keys()), "layers": int(config.get("num_hidden_layers", 0)),
                "hidden": hidden, "tensors_copied": len(names)}


def setup(run: DemoRun) -> None:
    files = data_files(run.data)
    train = load_task_data(files["train"], "classification")
    test = load_task_data(files["test"], "classification", labels=train.labels)
    probe = load_task_data(files["probe"], "causal-lm")
    labels = list(train.labels or ())
    run.paths.update(files)
    run.paths["base"] = run.out / "models" / "base"
    info = write_task_base(run.base, run.paths["base"], labels, seed=run.settings.seed)
    run.results["model"] = {"name": run.base_name, "path": str(run.base), **info}
    run.results["data"] = {"name": _data_name(files["train"]), "train": len(train), "test": len(test),
                           "probe": len(probe), "labels": labels,
                           "files": {k: f"{p.parent.name}/{p.name}" for k, p in files.items()}}


def _data_name(train: Path) -> str:
    return train.stem.removesuffix("_train") if train.stem.endswith("_train") else train.parent.name


# -- helpers shared by stages -------------------------------------------------------------------------
def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layer", "layers", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def per_layer(names: Iterable[str], counts: Iterable[int], layers: int) -> list[int]:
    """Sum ``counts`` by transformer layer index (names outside a layer are ignored)."""
    out = [0] * layers
    for name, count in zip(names, counts):
        layer = _layer_of(name)
        if layer is not None and layer < layers:
            out[layer] += count
    return out


# -- fine-tuning, merge, diff -----------------------------------------------------------------------
def _finetune(run: DemoRun, method: str, out: Path) -> dict[str, Any]:
    from surgeon.workflows.train.finetune import FinetuneOptions, finetune

    s = run.settings
    lora = method != "full"
    report = finetune(FinetuneOptions(
        base=str(run.paths["base"]), data=str(run.paths["train"]), out=str(out), task="classification", method=method,
        rank=s.lora_rank if lora else None, alpha=s.lora_alpha if lora else None, lr=s.lora_lr if lora else s.full_lr,
        epochs=s.epochs, batch_size=s.batch_size, max_length=s.max_length, seed=s.seed, device="cpu"))
    steps = -(-report.train_examples // report.batch_size) * report.epochs
    return {"method": f"LoRA r={report.rank}, \u03b1={report.alpha:g}" if lora else "full",
            "trainable_parameters": report.trainable_parameters, "total_parameters": report.total_parameters,
            "epochs": report.epochs, "steps": steps, "lr": report.lr, "train_loss": report.train_loss,
            "final_loss": report.train_loss[-1] if report.train_loss else None, "seconds": report.wall_time_s,
            "output": run.rel(out)}


def finetune_lora(run: DemoRun) -> None:
    run.paths["lora_adapter"] = run.out / "models" / "lora-adapter"
    run.results.setdefault("finetune", {})["lora"] = _finetune(run, "lora", run.paths["lora_adapter"])


def finetune_full(run: DemoRun) -> None:
    run.paths["full"] = run.out / "models" / "full"
    run.results.setdefault("finetune", {})["full"] = _finetune(run, "full", run.paths["full"])


def merge_lora(run: DemoRun) -> None:
    from surgeon.workflows.merge.run import merge

    run.paths["lora"] = run.out / "models" / "lora-merged"
    r = merge(run.paths["base"], [run.paths["lora_adapter"]], run.paths["lora"], dtype="auto", device="cpu")
    run.results["merge"] = {"output": run.rel(run.paths["lora"]), "dtype": r.dtype, "merged": r.merged,
                            "replaced": r.replaced, "copied": r.copied, "warnings": list(r.warnings), "seconds": r.seconds}


def _diff(run: DemoRun, key: str, adapter: Path | None) -> dict[str, Any]:
    from surgeon.workflows.taskvec.diff import diff_checkpoints

    r = diff_checkpoints(run.paths[key], run.paths["base"], None, ranks=False, adapter=adapter, device="cpu")
    s = r.summary
    out: dict[str, Any] = {"changed": s.changed.tensors, "changed_parameters": s.changed.parameters,
                           "rounding_only": s.rounding_only.tensors, "unchanged": s.identical.tensors,
                           "tau_norm": s.norm, "adapter_check": None}
    c = r.adapter_check
    if c is not None:
        out["adapter_check"] = {"passed": c.equivalent, "targets": len(c.targets), "max_abs_error": c.max_abs_diff,
                                "max_relative_error": c.max_relative_error, "min_cosine": c.min_cosine,
                                "tolerance": c.tolerance}
    return out


def diff_models(run: DemoRun) -> None:
    run.results["diff"] = {"lora": _diff(run, "lora", run.paths["lora_adapter"]), "full": _diff(run, "full", None)}


# -- evaluation -------------------------------------------------------------------------------------
def measure(run: DemoRun, model: Path) -> dict[str, float]:
    """Task accuracy on the test set and drift (1 - mean cosine to the base's embeddings) on the probe set."""
    from surgeon.workflows.train.evaluate import evaluate

    sizes = dict(batch_size=64, max_length=run.settings.max_length, device="cpu")
    task = evaluate(model, data=run.paths["test"], task="classification", **sizes)
    drift = evaluate(model, data=run.paths["probe"], drift_from=run.paths["base"], **sizes)
    assert task.metrics is not None and task.metrics.accuracy is not None and drift.drift is not None
    return {"accuracy": task.metrics.accuracy, "loss": task.metrics.loss, "drift": 1.0 - drift.drift.mean_cosine,
            "min_cosine": drift.drift.min_cosine}


def evaluate_all(run: DemoRun) -> None:
    labels = {"base": "base", "lora": "lora", "full": "full"}
    run.results["eval"] = {key: measure(run, run.paths[path]) for key, path in labels.items()}
    for point in run.results.get("sweep", []):
        point.update(measure(run, run.out / point["output"]))


# -- spectral stages ------------------------------------------------------------------------------
SIMILARITY_PLOTS = 2  # matrices whose similarity matrix is drawn, for LoRA and full alike


def _intruder_options(run: DemoRun) -> Any:
    from surgeon.workflows.spectral.intruders import IntruderOptions

    return IntruderOptions(epsilon=run.settings.epsilon, top_k=run.settings.top_k)


def _intruders(run: DemoRun, key: str, select: str | None, plot_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Intruder summary of model ``key`` against the base, and {matrix name: its similarity plot}."""
    from surgeon.workflows.spectral.intruders import find_intruders
    from surgeon.workflows.spectral.plots import choose

    r = find_intruders(run.paths[key], run.paths["base"], options=_intruder_options(run), device="cpu",
                       cache=run.paths["svd_cache"], plot=plot_dir, plot_matrices=select)
    layers = run.results["model"]["layers"]
    drawn = [Path(p) for p in r.plots if Path(p).name.startswith("similarity-")]
    similarity = dict(zip((row.name for row in choose(r.matrices, select)), drawn))
    by_layer = r.totals["per_layer"]
    summary = {"total": r.totals["intruders"], "matrices": r.totals["matrices"],
               "matrices_with_intruders": r.totals["with_intruders"],
               "per_layer": [int(by_layer.get(str(i), 0)) for i in range(layers)],
               "per_module": dict(r.totals["per_module"]), "epsilon_sweep": dict(r.totals["sweep"]),
               "seconds": r.seconds}
    return summary, similarity


def _keep_similarity(run: DemoRun, drawn: dict[str, Path], names: list[str], key: str, label: str) -> dict[str, dict[str, str]]:
    """Move the similarity plots of ``names`` into plots/ (numbered in that order)."""
    kept = {}
    for i, name in enumerate(names, 1):
        rel = f"plots/similarity-{i}-{key}.png"
        drawn[name].replace(run.out / rel)
        kept[f"similarity_{i}_{key}"] = {
            "file": rel, "caption": f"{label}, {name}: |cos| between its top-{run.settings.top_k} left singular "
                                    "vectors (rows) and the base's (columns); a row with no bright cell is an intruder."}
    return kept


def find_intruders(run: DemoRun) -> None:
    run.paths["svd_cache"] = run.out / "svd-cache"
    (run.out / "plots").mkdir(exist_ok=True)
    scratch = run.out / "plots" / "intruders-scratch"
    lora, lora_drawn = _intruders(run, "lora", None, scratch / "lora")
    names = list(lora_drawn)[:SIMILARITY_PLOTS]
    select = "^(" + "|".join(re.escape(n) for n in names) + ")$" if names else "^$"
    full, full_drawn = _intruders(run, "full", select, scratch / "full")
    plots = _keep_similarity(run, lora_drawn, names, "lora", "LoRA")
    plots.update(_keep_similarity(run, full_drawn, [n for n in names if n in full_drawn], "full", "Full fine-tuning"))
    shutil.rmtree(scratch)
    run.results["intruders"] = {"epsilon": run.settings.epsilon, "top_k": run.settings.top_k,
                                "layers": list(range(run.results["model"]["layers"])), "lora": lora, "full": full}
    run.results["plots"] = dict(sorted(plots.items()))


def scale_sweep(run: DemoRun) -> None:
    """The merged LoRA model with its intruders' singular values scaled by each lambda."""
    from surgeon.workflows.spectral.scale_intruders import scale_intruders

    points = []
    for lam in run.settings.lambdas:
        out = run.out / "models" / f"lora-scaled-{lam:g}"
        r = scale_intruders(run.paths["lora"], run.paths["base"], out, lam=lam, options=_intruder_options(run),
                            device="cpu", cache=run.paths["svd_cache"])
        points.append({"lambda": lam, "scaled": len(r.changes), "intruders": r.totals["intruders"],
                       "output": run.rel(out), "seconds": r.seconds})
    run.results["sweep"] = points
