"""The continual demo's artefacts: ``continual.json``, plots and a self-contained ``report.html``.

As for the plain demo, the page is built only from the JSON as written and the plot
files it names; CSS inline, plots embedded as ``data:`` URIs, the JSON embedded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgeon.report import figures
from surgeon.report.html import cards, figure, kv, page, section, table
from surgeon.report.text import drift_text, num, pct, secs
from surgeon.workflows.demo.report import publish_report

JSON_NAME = "continual.json"
HTML_NAME = "report.html"
PLOTS_DIR = "plots"
LABELS = {"lora": "LoRA", "full": "full fine-tuning"}
ARROW = " \u2192 "
COLORS = {"lora": figures.LORA_COLOR, "full": figures.FULL_COLOR}


def _tasks(d: dict[str, Any]) -> list[str]:
    return [t["name"] for t in d["tasks"]]


def plot_forgetting(d: dict[str, Any], path: Path) -> None:
    """Accuracy on each earlier task after every stage, one line per (method, task)."""
    names, ev = _tasks(d), d["eval"]
    series = []
    for method in ("lora", "full"):
        for t, name in enumerate(names[:-1]):
            stages = [s + 1 for s in range(t, len(names))]
            ys = [100 * ev[method]["accuracy"][s - 1][t] for s in stages]
            series.append((f"{LABELS[method]}: {name}", stages, ys, COLORS[method]))
    figures.lines(path, series, xlabel="after stage", ylabel="accuracy on an earlier task (%)",
                  title="Forgetting: accuracy on earlier tasks after each stage", size=(7.0, 3.4), clean=True,
                  integer_x=True)


def plot_intruders(d: dict[str, Any], path: Path) -> None:
    """Intruders after each stage, LoRA and full side by side (cumulative born as the second series)."""
    names, intr = _tasks(d), d["intruders"]
    cats = [f"{i + 1}: {n}" for i, n in enumerate(names)]
    series = []
    for method in ("lora", "full"):
        series.append((f"{LABELS[method]}: present", [p["intruders"] for p in intr[method]["per_stage"]], COLORS[method]))
    for method, color in (("lora", "#8fb3da"), ("full", "#eab08f")):
        series.append((f"{LABELS[method]}: ever born", [p["cumulative"] for p in intr[method]["per_stage"]], color))
    figures.bars(path, cats, series, stacked=False, xlabel="after stage", ylabel="intruder dimensions",
                 title=f"Intruders per stage (top-{intr['top_k']}, \u03b5 = {intr['epsilon']})", size=(7.0, 3.4),
                 integer=True, clean=True)


def plot_scale(d: dict[str, Any], path: Path) -> None:
    names, points = _tasks(d), d["scale"]["points"]
    series = [(f"\u03bb = {p['lambda']:g}", [100 * a for a in p["accuracy"]], None) for p in points]
    series.insert(0, ("as trained (\u03bb = 1)", [100 * a for a in d["eval"]["lora"]["accuracy"][-1]], figures.LORA_COLOR))
    figures.bars(path, names, series, stacked=False, xlabel="task", ylabel="accuracy (%)",
                 title="LoRA after the last stage: accumulated intruders scaled by \u03bb", size=(7.0, 3.4), clean=True)


def render_plots(d: dict[str, Any], out: Path) -> dict[str, dict[str, str]]:
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    made = {}
    for name, draw, caption in (
            ("forgetting", plot_forgetting, "Accuracy on each earlier task after every later stage (the encoder of that "
                                           "stage read out with the head trained on the task)."),
            ("intruders", plot_intruders, "Intruder dimensions present after each stage, and every one born so far."),
            ("scale", plot_scale, "Accuracy on every task of the last LoRA stage with its intruders scaled by \u03bb.")):
        rel = f"{PLOTS_DIR}/{name}.png"
        draw(d, out / rel)
        made[name] = {"file": rel, "caption": caption}
    return made


def _accuracy_table(d: dict[str, Any], method: str) -> str:
    names = _tasks(d)
    acc = d["eval"][method]["accuracy"]
    rows = [(f"{s + 1}: {names[s]}", *(pct(a) if a is not None else "\u2014" for a in acc[s]),
             drift_text(d["eval"][method]["drift"][s])) for s in range(len(names))]
    return f"<p><strong>{LABELS[method]}</strong></p>" + table(["after stage", *names, "drift from base"], rows)


def _sequence_table(d: dict[str, Any], method: str) -> str:
    rows = [(p["stage"], p["intruders"], p["new"], p["persisting"], p["vanished"], p["cumulative"],
             ", ".join(f"{k}:{v}" for k, v in p["born"].items()) or "-", p["matrices_with_intruders"])
            for p in d["intruders"][method]["per_stage"]]
    return f"<p><strong>{LABELS[method]}</strong></p>" + table(
        ["stage", "intruders", "new", "persisting", "vanished", "cumulative", "by stage born", "matrices"], rows)


def headline(d: dict[str, Any]) -> list[dict[str, str]]:
    ev, intr, names = d["eval"], d["intruders"], _tasks(d)
    first = names[0]
    last = {m: intr[m]["per_stage"][-1] for m in ("lora", "full")}
    best = max(d["scale"]["points"], key=lambda p: p["accuracy"][0])
    return [
        {"key": "first_task", "label": f"{first} accuracy after the last stage: LoRA / full",
         "text": f"{pct(ev['lora']['accuracy'][-1][0])} / {pct(ev['full']['accuracy'][-1][0])}",
         "detail": f"right after stage 1: {pct(ev['lora']['accuracy'][0][0])} / {pct(ev['full']['accuracy'][0][0])}"},
        {"key": "forgetting", "label": f"forgetting of {first} (points): LoRA / full",
         "text": f"{100 * ev['lora']['forgetting'][0]:.1f} / {100 * ev['full']['forgetting'][0]:.1f}",
         "detail": "accuracy right after its stage minus after the last"},
        {"key": "intruders", "label": "intruders after the last stage: LoRA vs full",
         "text": f"{last['lora']['intruders']} vs {last['full']['intruders']}",
         "detail": f"ever born: {last['lora']['cumulative']} vs {last['full']['cumulative']}"},
        {"key": "scale", "label": f"LoRA, intruders \u00d7 {best['lambda']:g}: {first} accuracy",
         "text": pct(best["accuracy"][0]), "detail": f"as trained {pct(ev['lora']['accuracy'][-1][0])}"},
        {"key": "drift", "label": "drift after the last stage: LoRA / full",
         "text": f"{drift_text(ev['lora']['drift'][-1])} / {drift_text(ev['full']['drift'][-1])}",
         "detail": "mean 1 \u2212 cos to the base's embeddings"},
        {"key": "time", "label": "total time", "text": secs(d["total_seconds"]),
         "detail": (f"CPU {secs(d['cpu_seconds'])}; " if "cpu_seconds" in d else "") + d.get("machine", "")},
    ]


def build_html(d: dict[str, Any], root: Path) -> str:
    plots, names = d["plots"], _tasks(d)
    m = d["model"]
    setup = kv([("model", m["name"]), ("parameters", f"{m['parameters']:,}"),
                ("tasks, in order", ARROW.join(f"{t['name']} ({t['train']} train / {t['test']} test)" for t in d["tasks"])),
                ("drift probe", f"{d['probe']} texts (every task's test texts)")])
    knobs = kv([(k.replace("_", " "), ", ".join(f"{x:g}" for x in v) if isinstance(v, list) else v)
                for k, v in d["settings"].items()])
    text = ("<p>One encoder trained on the tasks in order, each stage continuing the previous one "
            "(<code>surgeon finetune --continue-from</code>; a fresh head per task). After each stage the encoder is "
            "read out with the head trained on each earlier task, so what is measured is the encoder's forgetting.</p>")
    train_rows = [(LABELS[meth], r["stage"], r["task"], f"{r['trainable_parameters']:,}", num(r["final_loss"]), secs(r["seconds"]))
                  for meth in ("lora", "full") for r in d["finetune"][meth]]
    parts = [
        cards(d["headline"]),
        section("Setup", "setup", text + f'<div class="grid2">{setup}{knobs}</div>'),
        section("1. Training, stage by stage", "train", table(["method", "stage", "task", "trainable", "final loss", "time"], train_rows)),
        section("2. Forgetting", "forgetting", figure(root, plots["forgetting"]) + _accuracy_table(d, "lora") + _accuracy_table(d, "full")),
        section("3. Intruders across the stages", "intruders",
                f"<p>Intruders of each stage against the base (top-{d['intruders']['top_k']}, \u03b5 = {d['intruders']['epsilon']}); "
                f"one persists when its singular vector matches an intruder of the previous stage (|cos| \u2265 {d['intruders']['match']}).</p>"
                + figure(root, plots["intruders"]) + _sequence_table(d, "lora") + _sequence_table(d, "full")),
        section("4. Scaling the accumulated intruders", "scale",
                "<p>The LoRA model after the last stage with every intruder's singular value scaled by \u03bb.</p>"
                + figure(root, plots["scale"]) + table(
                    ["\u03bb", "intruders scaled", *names, "drift"],
                    [(f"{p['lambda']:g}", p["scaled"], *(pct(a) for a in p["accuracy"]), drift_text(p["drift"]))
                     for p in d["scale"]["points"]])),
        section("Stage timings", "timings", table(
            ["stage", "wall time", "CPU time"],
            [(s["title"], secs(s["seconds"]), secs(s["cpu_seconds"]) if "cpu_seconds" in s else "\u2014")
             for s in d["stages"]]
            + [("total", secs(d["total_seconds"]), secs(d["cpu_seconds"]) if "cpu_seconds" in d else "\u2014")])),
    ]
    return page(title=f"surgeon demo --continual: {m['name']}", heading="surgeon demo --continual",
                subtitle=f"{m['name']} through {ARROW.join(names)}: LoRA vs full fine-tuning, forgetting and intruders.",
                body=parts, footer=f"surgeon {d['surgeon_version']} \u00b7 {d['created']} \u00b7 data: {JSON_NAME}",
                data=d, data_id="demo-data")


def write_report(data: dict[str, Any], out: Path) -> tuple[Path, Path, dict[str, dict[str, str]]]:
    plots = render_plots(data, out)
    body = {**data, "plots": plots}
    body["headline"] = headline(body)
    html_path, json_path = publish_report(body, out, build_html, json_name=JSON_NAME, html_name=HTML_NAME)
    return html_path, json_path, plots
