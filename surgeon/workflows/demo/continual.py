"""`surgeon demo --continual`: one encoder through three tasks in sequence, LoRA and full fine-tuning side by side.

The paper's third finding (arXiv 2410.21228): in continual learning LoRA accumulates
intruder dimensions and forgets earlier tasks faster than full fine-tuning. Stages:

1. setup: one task base per task (the encoder copied byte for byte, a seeded random head
   with that task's labels), and a probe file of every task's test texts (for drift);
2. LoRA: stage 1 on task 1, then `finetune --continue-from` the previous adapter on
   task 2 and task 3 (a fresh head per task); each stage merged into its task base;
3. full fine-tuning: the same three stages;
4. evaluation: after each stage s, the accuracy on every task t ≤ s, measured with the
   stage-s encoder and the head trained at stage t (a head-swapped checkpoint: the
   encoder's tensors from stage s, ``classifier.*`` and the labels from stage t), so
   forgetting is the encoder's; drift from the base on the probe texts;
5. intruders per stage and their persistence (`intruders --sequence`), both methods;
6. the LoRA model after the last stage with its accumulated intruders scaled by each
   λ, evaluated on every task again (the heads swapped in as in 4);
7. ``continual.json``, plots and ``report.html``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgeon.errors import DataError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.data import load_task_data
from surgeon.io.writer import CheckpointWriter, TensorSpec
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text, safetensors_metadata
from surgeon.workflows.demo.stages import HEAD, TOKENIZER_FILES, write_task_base

TASKS = (("sentiment", "sentiment_train.jsonl", "sentiment_eval.jsonl"),
         ("topic", "topic_train.jsonl", "topic_eval.jsonl"),
         ("question", "question_train.jsonl", "question_eval.jsonl"))
METHODS = ("lora", "full")


@dataclass(frozen=True)
class ContinualSettings:
    """Knobs of the continual demo; the defaults keep MiniLM under 5 minutes on 2 CPU cores."""

    epochs: int = 2
    batch_size: int = 16
    max_length: int = 32
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_lr: float = 3e-3
    full_lr: float = 5e-5
    top_k: int = 10
    epsilon: float = 0.5
    match: float = 0.9
    lambdas: tuple[float, ...] = (0.0, 0.5)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lambdas"] = list(self.lambdas)
        return d


@dataclass(frozen=True)
class Task:
    name: str
    train: Path
    test: Path


@dataclass
class ContinualRun:
    out: Path
    base: Path
    base_name: str
    tasks: list[Task]
    settings: ContinualSettings
    results: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    labels: list[list[str]] = field(default_factory=list)

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.out))
        except ValueError:
            return str(path)

    def model(self, method: str, stage: int) -> Path:
        """The full checkpoint of ``method`` after ``stage`` (1-based): LoRA merged into its task base."""
        return self.paths[f"{method}-{stage}"]


def packaged_tasks() -> list[Task]:
    from surgeon.io.embedded import data_file

    return [Task(name, data_file(train), data_file(test)) for name, train, test in TASKS]


# -- setup -----------------------------------------------------------------------------------------
def setup(run: ContinualRun) -> None:
    if len(run.tasks) < 2:
        raise DataError(f"the continual demo needs at least two tasks; got {len(run.tasks)}.")
    probe_rows, described = [], []
    for i, task in enumerate(run.tasks, 1):
        train = load_task_data(task.train, "classification")
        test = load_task_data(task.test, "classification", labels=train.labels)
        labels = list(train.labels or ())
        run.labels.append(labels)
        run.paths[f"base-{i}"] = run.out / "models" / f"base-{task.name}"
        info = write_task_base(run.base, run.paths[f"base-{i}"], labels, seed=run.settings.seed)
        probe_rows += [{"text": t} for t in test.texts]
        described.append({"name": task.name, "train": len(train), "test": len(test), "labels": labels,
                          "files": [f"{task.train.parent.name}/{task.train.name}", f"{task.test.parent.name}/{task.test.name}"]})
    run.paths["probe"] = run.out / "data" / "probe.jsonl"
    run.paths["probe"].parent.mkdir(parents=True, exist_ok=True)
    run.paths["probe"].write_text("".join(json.dumps(r) + "\n" for r in probe_rows), encoding="utf-8")
    run.results["model"] = {"name": run.base_name, "path": str(run.base), **info}
    run.results["tasks"] = described
    run.results["probe"] = len(probe_rows)


# -- training -----------------------------------------------------------------------------------------
def _finetune_stage(run: ContinualRun, method: str, stage: int, previous: Path | None) -> tuple[Path, dict[str, Any]]:
    from surgeon.workflows.train.finetune import FinetuneOptions, finetune

    s, lora, task = run.settings, method == "lora", run.tasks[stage - 1]
    out = run.out / "models" / (f"lora-adapter-{stage}" if lora else f"full-{stage}")
    first = previous is None
    report = finetune(FinetuneOptions(
        base=str(run.paths[f"base-{stage}"]), data=str(task.train), out=str(out), task="classification", method=method,
        rank=s.lora_rank if lora and first else None, alpha=s.lora_alpha if lora and first else None,
        lr=s.lora_lr if lora else s.full_lr, epochs=s.epochs, batch_size=s.batch_size, max_length=s.max_length,
        seed=s.seed, device="cpu", continue_from=str(previous) if previous is not None else None))
    return out, {"stage": stage, "task": task.name, "trainable_parameters": report.trainable_parameters,
                 "final_loss": report.train_loss[-1] if report.train_loss else None, "seconds": report.wall_time_s,
                 "output": run.rel(out)}


def train(run: ContinualRun, method: str) -> None:
    from surgeon.workflows.merge.run import merge

    rows, previous = [], None
    for stage in range(1, len(run.tasks) + 1):
        out, row = _finetune_stage(run, method, stage, previous)
        previous = out
        if method == "lora":
            merged = run.out / "models" / f"lora-{stage}"
            r = merge(run.paths[f"base-{stage}"], [out], merged, dtype="auto", device="cpu")
            row["merge_seconds"] = r.seconds
            run.paths[f"lora-{stage}"] = merged
        else:
            run.paths[f"full-{stage}"] = out
        rows.append(row)
    run.results.setdefault("finetune", {})[method] = rows


def train_lora(run: ContinualRun) -> None:
    train(run, "lora")


def train_full(run: ContinualRun) -> None:
    train(run, "full")


# -- evaluation --------------------------------------------------------------------------------------
def with_head(encoder: Path, head: Path, out: Path) -> Path:
    """A checkpoint with every tensor of ``encoder`` but the head, and the head (``classifier.*``)
    and config.json of ``head``: the encoder of one stage read out with an earlier task's head."""
    with Checkpoint.open(encoder) as enc, Checkpoint.open(head) as hd:
        body = [n for n in enc.keys() if not n.startswith(HEAD + ".")]
        heads = [n for n in hd.keys() if n.startswith(HEAD + ".")]
        specs = [TensorSpec(n, enc.info(n).dtype, enc.info(n).shape) for n in body]
        specs += [TensorSpec(n, hd.info(n).dtype, hd.info(n).shape) for n in heads]
        config = json.dumps(hd.config() or {}, indent=2) + "\n"
        record = provenance("demo", {"stage": "head-swap"}, inputs={"encoder": str(encoder), "head": str(head)})
        sidecars = [p for p in enc.extra_files() if p.name in TOKENIZER_FILES]
        with CheckpointWriter(out, specs, inputs=[encoder, head], metadata=safetensors_metadata(record),
                              extra_files=sidecars, extra_texts={"config.json": config,
                                                                 PROVENANCE_FILE: provenance_file_text(record)}) as writer:
            for n in body:
                writer.copy_from(enc, n)
            for n in heads:
                writer.copy_from(hd, n)
    return out


def accuracy(run: ContinualRun, model: Path, task: int) -> float:
    """Accuracy of ``model`` (its own head) on the test set of ``task`` (1-based)."""
    from surgeon.workflows.train.evaluate import evaluate

    r = evaluate(model, data=run.tasks[task - 1].test, task="classification", batch_size=64,
                 max_length=run.settings.max_length, device="cpu")
    assert r.metrics is not None and r.metrics.accuracy is not None
    return r.metrics.accuracy


def accuracy_with_head(run: ContinualRun, encoder: Path, head: Path, task: int, *, same: bool) -> float:
    """Accuracy on ``task`` of ``encoder`` read out with ``head``'s classifier (``same``: it has it already)."""
    if same:
        return accuracy(run, encoder, task)
    # a new folder for every pair: a command never writes where it has read (the first swap was read)
    scratch = run.out / "models" / f"head-swap-{encoder.name}-task{task}"
    try:
        return accuracy(run, with_head(encoder, head, scratch), task)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def drift(run: ContinualRun, model: Path) -> float:
    """1 − mean cosine between the model's and the base's embeddings of the probe texts."""
    from surgeon.workflows.train.evaluate import evaluate

    r = evaluate(model, data=run.paths["probe"], drift_from=run.paths["base-1"], batch_size=64,
                 max_length=run.settings.max_length, device="cpu")
    assert r.drift is not None
    return 1.0 - r.drift.mean_cosine


def evaluate_all(run: ContinualRun) -> None:
    """accuracy[method][s][t]: after stage s+1, on task t+1 (None for a task not yet trained)."""
    n = len(run.tasks)
    out: dict[str, Any] = {}
    for method in METHODS:
        matrix, drifts = [], []
        for s in range(1, n + 1):
            row = [accuracy_with_head(run, run.model(method, s), run.model(method, t), t, same=t == s)
                   for t in range(1, s + 1)]
            matrix.append(row + [None] * (n - s))
            drifts.append(drift(run, run.model(method, s)))
        out[method] = {"accuracy": matrix, "drift": drifts,
                       "forgetting": [matrix[t][t] - matrix[-1][t] for t in range(n - 1)]}
    run.results["eval"] = out


# -- spectral ------------------------------------------------------------------------------------------
def _intruder_options(run: ContinualRun) -> Any:
    from surgeon.workflows.spectral.results import IntruderOptions

    return IntruderOptions(epsilon=run.settings.epsilon, top_k=run.settings.top_k)


def intruders(run: ContinualRun) -> None:
    from surgeon.workflows.spectral.sequence import find_intruders_sequence

    run.paths["svd_cache"] = run.out / "svd-cache"
    summary: dict[str, Any] = {"epsilon": run.settings.epsilon, "top_k": run.settings.top_k, "match": run.settings.match}
    for method in METHODS:
        stages = [run.model(method, s) for s in range(1, len(run.tasks) + 1)]
        r = find_intruders_sequence(stages, run.paths["base-1"], options=_intruder_options(run), match=run.settings.match,
                                    device="cpu", cache=run.paths["svd_cache"])
        view = r.sequence
        summary[method] = {
            "per_stage": [{"stage": v.stage, "intruders": v.intruders, "new": v.new, "persisting": v.persisting,
                           "vanished": v.vanished, "cumulative": v.cumulative, "born": v.born,
                           "matrices_with_intruders": m.totals["with_intruders"], "sweep": m.totals["sweep"]}
                          for v, m in zip(view.stages, r.models)],
            "seconds": r.seconds, "base_decompositions": r.cache["misses"],
        }
    run.results["intruders"] = summary


def scale(run: ContinualRun) -> None:
    """The LoRA model after the last stage with all its intruders scaled by each λ, on every task."""
    from surgeon.workflows.spectral.scale_intruders import scale_intruders

    n = len(run.tasks)
    last = run.model("lora", n)
    points = []
    for lam in run.settings.lambdas:
        out = run.out / "models" / f"lora-{n}-scaled-{lam:g}"
        r = scale_intruders(last, run.paths["base-1"], out, lam=lam, options=_intruder_options(run), device="cpu",
                            cache=run.paths["svd_cache"])
        acc = [accuracy_with_head(run, out, run.model("lora", t), t, same=t == n) for t in range(1, n + 1)]
        points.append({"lambda": lam, "scaled": sum(len(c.ranks) for c in r.changes), "matrices": len(r.changes),
                       "accuracy": acc, "drift": drift(run, out), "output": run.rel(out), "seconds": r.seconds})
    run.results["scale"] = {"model": run.rel(last), "points": points}
