"""`surgeon demo`: the whole pipeline on a small pretrained model, with a report.

Stages (each a function of the run's state, timed):

1. fine-tune the base twice on the demo classification set: LoRA and full;
2. merge the LoRA adapter into the base;
3. diff both fine-tunes against the base (task vectors; adapter equivalence check);
4. find intruder dimensions in both;
5. scale the LoRA model's intruders by each lambda of a sweep;
6. evaluate task accuracy and forgetting (embedding drift from the base) of
   the base, both fine-tunes and every lambda;
7. write ``demo.json``, the plots and a self-contained ``report.html``.

The base defaults to the pip-installed all-MiniLM-L6-v2 (extra ``demo``);
tests pass a tiny model, tiny data and tiny settings to run it in seconds.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from surgeon import __version__
from surgeon.errors import OutputError
from surgeon.io.output import claim_work_folder
from surgeon.io.resolve import resolve_path
from surgeon.ops.threads import torch_threads
from surgeon.workflows.demo import stages
from surgeon.workflows.demo.settings import DemoRun, DemoSettings
from surgeon.workflows.demo.report import drift_text, num, pct, secs, write_report

MINILM_NAME = "all-MiniLM-L6-v2"
ACCURACY_SLACK = 0.01  # the headline's repaired model may lose at most this much task accuracy


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    run: Callable[[DemoRun], None]


STAGES: tuple[Stage, ...] = (
    Stage("setup", "Load model and data", stages.setup),
    Stage("finetune-lora", "Fine-tune: LoRA", stages.finetune_lora),
    Stage("finetune-full", "Fine-tune: full", stages.finetune_full),
    Stage("merge", "Merge LoRA into the base", stages.merge_lora),
    Stage("diff", "Diff: task vectors + adapter check", stages.diff_models),
    Stage("intruders", "Intruder dimensions (LoRA, full)", stages.find_intruders),
    Stage("scale-intruders", "Scale intruders (\u03bb sweep)", stages.scale_sweep),
    Stage("eval", "Evaluate accuracy and forgetting", stages.evaluate_all),
)


@dataclass(frozen=True)
class StageTiming:
    name: str
    title: str
    seconds: float


@dataclass(frozen=True)
class DemoReport:
    output: str
    html: str
    json: str
    plots: list[str]
    headline: list[dict[str, str]]
    stages: list[StageTiming]
    total_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default_model() -> tuple[Path, str]:
    from surgeon.io.embedded import minilm_path

    return minilm_path(), MINILM_NAME


def _prepare_output(out: Path, inputs: list[Path], *, overwrite: bool) -> None:
    out = out.resolve()
    for p in inputs:
        p = p.resolve()
        if out == p or out in p.parents or p in out.parents:
            raise OutputError(f"{out}: the demo output folder overlaps its input {p}; choose another -o folder.")
    # locked for this run; --overwrite replaces only a folder an earlier demo wrote (never `-o ~`)
    claim_work_folder(out, overwrite=overwrite, owned=("continual.json", "demo.json", "models"), what="demo folder")


def run_demo(
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    settings: DemoSettings = DemoSettings(),
    overwrite: bool = False,
    on_stage: Callable[[int, int, str, float | None], None] | None = None,
) -> DemoReport:
    """Run every stage on ``model`` (default: embedded MiniLM) and write the report into ``out``.

    ``data`` is a classification data file (default: the set shipped with surgeon).
    ``on_stage(i, n, title, seconds)`` is called before (seconds None) and after each stage.
    """
    if model is None:
        base, name = _default_model()
    else:
        base = resolve_path(model)
        name = base.name
    data_path = resolve_path(data) if data is not None else None
    out_path = Path(out)
    _prepare_output(out_path, [base] + ([data_path] if data_path else []), overwrite=overwrite)
    run = DemoRun(out=out_path.resolve(), base=base, base_name=name, data=data_path, settings=settings)
    timings: list[StageTiming] = []
    started = time.perf_counter()
    for i, stage in enumerate(STAGES, 1):
        if on_stage:
            on_stage(i, len(STAGES), stage.title, None)
        t0 = time.perf_counter()
        stage.run(run)
        timings.append(StageTiming(stage.name, stage.title, time.perf_counter() - t0))
        if on_stage:
            on_stage(i, len(STAGES), stage.title, timings[-1].seconds)
    t0 = time.perf_counter()
    body = _report_data(run, timings, time.perf_counter() - started)
    html_path, json_path, plots = write_report(body, run.out)
    timings.append(StageTiming("report", "Write report", time.perf_counter() - t0))
    return DemoReport(str(run.out), str(html_path), str(json_path), [p["file"] for p in plots.values()],
                      body["headline"], timings, time.perf_counter() - started)


def _report_data(run: DemoRun, timings: list[StageTiming], total: float) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": 1,
        "surgeon_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "settings": run.settings.to_dict(),
        **run.results,
        "stages": [asdict(t) for t in timings],
        "total_seconds": total,
    }
    body["headline"] = headline(body)
    return body


def best_tradeoff(sweep: list[dict[str, Any]], accuracy: float) -> dict[str, Any]:
    """The sweep point with the least drift among those within ACCURACY_SLACK of ``accuracy`` (ties: smaller lambda)."""
    kept = [p for p in sweep if p["accuracy"] >= accuracy - ACCURACY_SLACK - 1e-12] or sweep
    return min(kept, key=lambda p: (p["drift"], p["lambda"]))


def headline(d: dict[str, Any]) -> list[dict[str, str]]:
    """The few numbers worth a glance, as display text (the HTML cards and the CLI summary)."""
    ev, intr, sweep = d["eval"], d["intruders"], d["sweep"]
    repaired = best_tradeoff(sweep, ev["lora"]["accuracy"])
    check = d["diff"]["lora"].get("adapter_check") or {}
    return [
        {"key": "accuracy", "label": "task accuracy: base \u2192 LoRA / full",
         "text": f"{pct(ev['lora']['accuracy'])} / {pct(ev['full']['accuracy'])}", "detail": f"base {pct(ev['base']['accuracy'])}"},
        {"key": "intruders", "label": "intruder dimensions: LoRA vs full",
         "text": f"{intr['lora']['total']} vs {intr['full']['total']}", "detail": f"top-{intr['top_k']}, \u03b5 = {intr['epsilon']}"},
        {"key": "forgetting", "label": "forgetting (drift): LoRA / full",
         "text": f"{drift_text(ev['lora']['drift'])} / {drift_text(ev['full']['drift'])}", "detail": "mean 1 \u2212 cos to base embeddings"},
        {"key": "repair", "label": f"LoRA repaired (intruders \u00d7 {repaired['lambda']:g}): accuracy, drift",
         "text": f"{pct(repaired['accuracy'])}, {drift_text(repaired['drift'])}",
         "detail": f"least drift within {100 * ACCURACY_SLACK:g} point of LoRA's accuracy; as trained: "
                   f"{pct(ev['lora']['accuracy'])}, {drift_text(ev['lora']['drift'])}"},
        {"key": "adapter_check", "label": "merge = adapter (max |\u0394|)",
         "text": num(check.get("max_abs_error")), "detail": "passed" if check.get("passed") else "FAILED"},
        {"key": "time", "label": "total time", "text": secs(d["total_seconds"]), "detail": f"{os.cpu_count()} CPU cores"},
    ]


# -- `surgeon demo --continual` ---------------------------------------------------------------------
def _continual_stages() -> tuple[Stage, ...]:
    from surgeon.workflows.demo import continual as c

    return (Stage("setup", "Load model and the three tasks", c.setup),
            Stage("train-lora", "LoRA through the tasks (continued stage by stage, merged)", c.train_lora),
            Stage("train-full", "Full fine-tuning through the tasks", c.train_full),
            Stage("eval", "Accuracy on every earlier task after each stage, drift", c.evaluate_all),
            Stage("intruders", "Intruders per stage and their persistence", c.intruders),
            Stage("scale-intruders", "Scale the accumulated LoRA intruders", c.scale))


def run_continual_demo(
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    tasks: list[tuple[str, str | os.PathLike[str], str | os.PathLike[str]]] | None = None,
    settings: Any = None,
    overwrite: bool = False,
    on_stage: Callable[[int, int, str, float | None], None] | None = None,
) -> DemoReport:
    """The continual demo on ``model`` (default: embedded MiniLM) through ``tasks`` ((name, train, test), in
    order; default: sentiment, topic, question as shipped); report and JSON into ``out``."""
    from surgeon.workflows.demo import continual as c
    from surgeon.workflows.demo.continual_report import write_report as write_continual

    base, name = _default_model() if model is None else (resolve_path(model), resolve_path(model).name)
    chosen = c.packaged_tasks() if tasks is None else [c.Task(n, resolve_path(tr), resolve_path(te)) for n, tr, te in tasks]
    out_path = Path(out)
    _prepare_output(out_path, [base] + ([p for t in chosen for p in (t.train, t.test)] if tasks else []),
                    overwrite=overwrite)
    run = c.ContinualRun(out=out_path.resolve(), base=base, base_name=name, tasks=chosen,
                         settings=settings or c.ContinualSettings())
    stages = _continual_stages()
    timings: list[StageTiming] = []
    cpu: list[float] = []
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    with torch_threads(run.settings.threads):
        for i, stage in enumerate(stages, 1):
            if on_stage:
                on_stage(i, len(stages), stage.title, None)
            t0, c0 = time.perf_counter(), _cpu_seconds()
            stage.run(run)  # type: ignore[arg-type]
            timings.append(StageTiming(stage.name, stage.title, time.perf_counter() - t0))
            cpu.append(_cpu_seconds() - c0)
            if on_stage:
                on_stage(i, len(stages), stage.title, timings[-1].seconds)
    body: dict[str, Any] = {
        "schema": 1, "surgeon_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "settings": run.settings.to_dict(), **run.results,
        "stages": [{**asdict(t), "cpu_seconds": c} for t, c in zip(timings, cpu)],
        "cpu_seconds": _cpu_seconds() - cpu_started,
        "total_seconds": time.perf_counter() - started, "machine": _machine(run.settings.threads),
    }
    html_path, json_path, plots = write_continual(body, run.out)
    written = json.loads(json_path.read_text(encoding="utf-8"))
    return DemoReport(str(run.out), str(html_path), str(json_path), [p["file"] for p in plots.values()],
                      written["headline"], timings, time.perf_counter() - started)


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (every thread)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine(threads: int | None) -> str:
    """CPU cores, torch threads and the load average when the run ended (the machine may be shared)."""
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    import torch

    used = threads if threads is not None else torch.get_num_threads()
    return f"{os.cpu_count()} CPU cores, {used} torch thread{'s' if used != 1 else ''}, load average {load}"
