"""`surgeon demo --continual`: one encoder through three tasks in sequence, LoRA and full fine-tuning side by side.

The paper's third finding (arXiv 2410.21228): in continual learning LoRA accumulates
intruder dimensions and forgets earlier tasks faster than full fine-tuning. Stages:

1. setup: one task base per task (the encoder copied byte for byte, a seeded random head
   with that task's labels), and a probe file of every task's test texts (for drift);
2. LoRA: stage 1 on task 1, then `finetune --continue-from` the previous adapter on
   task 2 and task 3 (a fresh head per task); each stage merged into its task base;
3. full fine-tuning: the same three stages;
4. evaluation: after each stage s, the accuracy on every task t ≤ s, measured with the
   stage-s encoder and the head trained at stage t (its ``classifier.*`` tensors and
   labels copied into the loaded stage-s model: each model is loaded once), so
   forgetting is the encoder's; drift from the base on the probe texts;
5. intruders per stage and their persistence (`intruders --sequence`), both methods;
6. the LoRA model after the last stage with its accumulated intruders scaled by each
   λ, evaluated on every task again (the heads swapped in as in 4);
7. ``continual.json``, plots and ``report.html``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from surgeon.errors import DataError
from surgeon.io.data import load_task_data
from surgeon.workflows.demo.stages import write_task_base

TASKS = (("sentiment", "sentiment_train.jsonl", "sentiment_eval.jsonl"),
         ("topic", "topic_train.jsonl", "topic_eval.jsonl"),
         ("question", "question_train.jsonl", "question_eval.jsonl"))
METHODS = ("lora", "full")


@dataclass(frozen=True)
class ContinualSettings:
    """Knobs of the continual demo; the defaults keep MiniLM under 5 minutes on 2 CPU cores.

    Measured on the shipped tasks (README): at LoRA lr 3e-3 (the plain demo's) the continued
    stages collapsed to chance; at 5e-4 with a fresh head trained at ``head_lr`` each stage
    learns its task. Batches of 8 give twice the steps of 16 for about the same compute.
    One torch thread: on a shared machine two threads spin against other jobs and cost
    several times the CPU; one also gives the same arithmetic whatever the core count.
    """

    epochs: int = 3
    batch_size: int = 8
    max_length: int = 32
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_lr: float = 5e-4
    full_lr: float = 5e-5
    head_lr: float | None = 1e-2  # the fresh head of every stage, both methods (None: the method's lr)
    top_k: int = 10
    epsilon: float = 0.5
    match: float = 0.9
    lambdas: tuple[float, ...] = (0.0, 0.5)
    seed: int = 0
    threads: int | None = 1  # torch's intra-op threads for the run (None: torch's default)

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
    reader: Any = None  # continual_eval.Reader, made on first use

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
        lr=s.lora_lr if lora else s.full_lr, head_lr=s.head_lr, epochs=s.epochs, batch_size=s.batch_size, max_length=s.max_length,
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
def reader(run: ContinualRun) -> Any:
    """The run's :class:`~surgeon.workflows.demo.continual_eval.Reader`, made on first use."""
    from surgeon.workflows.demo.continual_eval import make_reader

    if run.reader is None:
        run.reader = make_reader([t.test for t in run.tasks], run.labels, run.paths["probe"], run.paths["base-1"],
                                 max_length=run.settings.max_length)
    return run.reader


def evaluate_all(run: ContinualRun) -> None:
    """accuracy[method][s][t]: after stage s+1, on task t+1 (None for a task not yet trained)."""
    from surgeon.workflows.demo.continual_eval import measure

    n, r = len(run.tasks), reader(run)
    out: dict[str, Any] = {}
    for method in METHODS:
        matrix, drifts = [], []
        for s in range(1, n + 1):
            row, drift = measure(r, run.model(method, s), s, [run.model(method, t) for t in range(1, s + 1)])
            matrix.append(row + [None] * (n - s))
            drifts.append(drift)
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
    from surgeon.workflows.demo.continual_eval import measure
    from surgeon.workflows.spectral.scale_intruders import scale_intruders

    n = len(run.tasks)
    last = run.model("lora", n)
    points = []
    for lam in run.settings.lambdas:
        out = run.out / "models" / f"lora-{n}-scaled-{lam:g}"
        r = scale_intruders(last, run.paths["base-1"], out, lam=lam, options=_intruder_options(run), device="cpu",
                            cache=run.paths["svd_cache"])
        heads = [run.model("lora", t) for t in range(1, n)] + [out]
        acc, drift = measure(reader(run), out, n, heads)
        points.append({"lambda": lam, "scaled": sum(len(c.ranks) for c in r.changes), "matrices": len(r.changes),
                       "accuracy": acc, "drift": drift, "output": run.rel(out), "seconds": r.seconds})
    run.results["scale"] = {"model": run.rel(last), "points": points}
