"""The demo's artefacts: ``demo.json``, plots (PNG) and a self-contained ``report.html``.

The HTML is built only from the JSON as written to disk and the plot files it
names, so the page and the data cannot disagree. The page has no external
assets: CSS is inline, plots are embedded as base64 ``data:`` URIs, and the
JSON itself is embedded in a ``<script type="application/json">`` block.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from surgeon.io.output import write_side_output

from surgeon.report import figures
from surgeon.report.html import cards, escape, figure, kv, page, section, table
from surgeon.report.text import drift_text, num, pct, secs

JSON_NAME = "demo.json"
HTML_NAME = "report.html"
PLOTS_DIR = "plots"
LORA_COLOR, FULL_COLOR, BASE_COLOR = figures.LORA_COLOR, figures.FULL_COLOR, figures.BASE_COLOR
__all__ = ["HTML_NAME", "JSON_NAME", "drift_text", "num", "pct", "secs", "write_report"]



# -- plots -----------------------------------------------------------------------------------------
def plot_intruders_per_layer(data: dict[str, Any], path: Path) -> None:
    """Grouped bars: intruder dimensions per transformer layer, LoRA vs full fine-tuning."""
    intr = data["intruders"]
    figures.bars(path, [str(layer) for layer in intr["layers"]],
                 [(f"LoRA (total {intr['lora']['total']})", intr["lora"]["per_layer"], LORA_COLOR),
                  (f"full fine-tuning (total {intr['full']['total']})", intr["full"]["per_layer"], FULL_COLOR)],
                 stacked=False, xlabel="layer", ylabel="intruder dimensions",
                 title=f"Intruder dimensions per layer (top-{intr['top_k']}, \u03b5 = {intr['epsilon']})",
                 size=(7.0, 3.4), integer=True, clean=True)


def plot_epsilon_sweep(data: dict[str, Any], path: Path) -> None:
    """Total intruder count against the threshold epsilon, LoRA vs full fine-tuning."""
    intr = data["intruders"]
    series = []
    for key, color, label in (("lora", LORA_COLOR, "LoRA"), ("full", FULL_COLOR, "full fine-tuning")):
        sweep = intr[key]["epsilon_sweep"]
        eps = sorted(sweep, key=float)
        series.append((label, [float(e) for e in eps], [sweep[e] for e in eps], color))
    figures.lines(path, series, xlabel="\u03b5 (a tuned direction is an intruder when its best |cos| to the base is below \u03b5)",
                  ylabel="intruders (all matrices)", title="Intruder count against \u03b5", size=(7.0, 3.0),
                  vline=intr["epsilon"], clean=True)


def plot_tradeoff(data: dict[str, Any], path: Path) -> None:
    """Left: accuracy and drift against lambda. Right: accuracy against drift, one point per lambda."""
    sweep, ev = data["sweep"], data["eval"]
    refs = {label: (ev[key]["drift"], 100 * ev[key]["accuracy"], color)
            for key, color, label in (("base", BASE_COLOR, "base"), ("full", FULL_COLOR, "full fine-tuning")) if key in ev}
    figures.tradeoff(path, [p["lambda"] for p in sweep], [100 * p["accuracy"] for p in sweep],
                     [p["drift"] for p in sweep], references=refs)


def render_plots(data: dict[str, Any], out: Path) -> dict[str, dict[str, str]]:
    """Draw the plots that derive from the data; return {name: {file, caption}} (paths relative to out)."""
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    made: dict[str, dict[str, str]] = {}
    if {"lora", "full"} <= set(data.get("intruders", {})):
        rel = f"{PLOTS_DIR}/intruders_per_layer.png"
        plot_intruders_per_layer(data, out / rel)
        made["intruders_per_layer"] = {"file": rel, "caption": "Intruder dimensions per layer, LoRA vs full fine-tuning."}
        rel = f"{PLOTS_DIR}/epsilon_sweep.png"
        plot_epsilon_sweep(data, out / rel)
        made["epsilon_sweep"] = {"file": rel, "caption": "Intruder count against the threshold \u03b5, LoRA vs full fine-tuning."}
    if data.get("sweep") and data.get("eval"):
        rel = f"{PLOTS_DIR}/accuracy_vs_forgetting.png"
        plot_tradeoff(data, out / rel)
        made["accuracy_vs_forgetting"] = {
            "file": rel, "caption": "Task accuracy and forgetting of the LoRA model as its intruder dimensions are scaled by \u03bb."}
    return made


# -- HTML ------------------------------------------------------------------------------------------
def _setup_section(d: dict[str, Any]) -> str:
    m, ds, st = d["model"], d["data"], d["settings"]
    rows = [("model", m["name"]), ("parameters", f"{m['parameters']:,}"), ("layers \u00d7 hidden", f"{m['layers']} \u00d7 {m['hidden']}"),
            ("task data", ds["name"]), ("train / test examples", f"{ds['train']} / {ds['test']}"),
            ("labels", ", ".join(map(str, ds["labels"]))), ("drift probe sentences", ds["probe"])]
    rows += [(f"{k} file", v) for k, v in ds.get("files", {}).items()]
    knobs = [(k.replace("_", " "), ", ".join(f"{x:g}" for x in v) if isinstance(v, list) else v) for k, v in st.items()]
    text = ("<p>The base is the pretrained encoder with a classification head added (its weights copied byte for byte; "
            "the head drawn at random with the seed): the \u201cbefore\u201d model that both fine-tunes start from "
            "and every diff compares with.</p>")
    return section("Setup", "setup", text + f'<div class="grid2">{kv(rows)}{kv(knobs)}</div>')


def _finetune_section(d: dict[str, Any]) -> str:
    rows = [(r["method"], f"{r['trainable_parameters']:,}", r["epochs"], r["steps"], num(r["final_loss"]), secs(r["seconds"]), r["output"])
            for r in (d["finetune"][k] for k in ("lora", "full") if k in d["finetune"])]
    text = ("<p>The same data, the same number of epochs: a low-rank adapter on the attention and MLP matrices, "
            "and full fine-tuning of every weight.</p>")
    return section("1. Fine-tuning", "finetune", text + table(["method", "trainable params", "epochs", "steps", "final loss", "time", "output"], rows))


def _merge_section(d: dict[str, Any]) -> str:
    m = d["merge"]
    rows = [("output", m["output"]), ("dtype", m["dtype"]), ("tensors merged (W + s\u00b7B\u00b7A)", m["merged"]),
            ("tensors replaced (the trained head)", m["replaced"]), ("tensors copied byte for byte", m["copied"]),
            ("time", secs(m["seconds"]))]
    return section("2. Merge", "merge", "<p>The LoRA adapter merged into the base, tensor by tensor, one rounding.</p>" + kv(rows))


def _diff_section(d: dict[str, Any]) -> str:
    rows = []
    for key, label in (("lora", "LoRA (merged)"), ("full", "full fine-tuning")):
        if key not in d["diff"]:
            continue
        r = d["diff"][key]
        check = r.get("adapter_check")
        verdict = "\u2014" if not check else (
            f"{'passed' if check['passed'] else 'FAILED'}: max |\u0394| {num(check['max_abs_error'])}")
        rows.append((label, r["changed"], r["rounding_only"], r["unchanged"], num(r["tau_norm"]), verdict))
    text = ("<p>Task vectors \u03c4 = \u03b8<sub>tuned</sub> \u2212 \u03b8<sub>base</sub>. For the merged LoRA model, "
            "the adapter equivalence check recomputes s\u00b7B\u00b7A for every adapted matrix and compares it with \u03c4.</p>")
    return section("3. Diff: task vectors", "diff", text + table(
        ["model", "changed tensors", "rounding only", "unchanged", "\u2016\u03c4\u2016", "adapter equivalence"], rows))


def _intruders_section(d: dict[str, Any], root: Path) -> str:
    intr, plots = d["intruders"], d.get("plots", {})
    rows = [(label, intr[k]["total"], f"{intr[k]['matrices_with_intruders']} / {intr[k]['matrices']}")
            for k, label in (("lora", "LoRA"), ("full", "full fine-tuning")) if k in intr]
    text = (f"<p>A left singular vector among the top-{intr['top_k']} of a fine-tuned matrix is an <em>intruder</em> when its "
            f"cosine similarity to every singular vector of the base matrix stays below \u03b5 = {intr['epsilon']} "
            "(arXiv 2410.21228). LoRA tends to introduce them; full fine-tuning mostly does not.</p>")
    modules = sorted(set(intr["lora"]["per_module"]) | set(intr["full"]["per_module"]))
    by_module = table(["module type", "LoRA", "full fine-tuning"],
                       [(m, intr["lora"]["per_module"].get(m, 0), intr["full"]["per_module"].get(m, 0)) for m in modules])
    figs = "".join(figure(root, plots[n]) for n in ("intruders_per_layer", "epsilon_sweep") if n in plots)
    sims = sorted((n for n in plots if n.startswith("similarity_")), key=lambda n: (n.split("_")[1], n.endswith("full")))
    sim_text = ("<p>Similarity matrices of the LoRA model's matrices with the most intruder energy, "
                "and of the same matrices after full fine-tuning.</p>") if sims else ""
    return section("4. Intruder dimensions", "intruders",
                    text + '<div class="grid2">' + table(["model", "intruders", "matrices with intruders"], rows)
                    + by_module + "</div>" + figs + sim_text + "".join(figure(root, plots[n]) for n in sims))


def _sweep_section(d: dict[str, Any], root: Path) -> str:
    rows = [(f"{p['lambda']:g}", p["scaled"], pct(p["accuracy"]), drift_text(p["drift"])) for p in d["sweep"]]
    text = ("<p>Each intruder's singular value of the LoRA model is multiplied by \u03bb "
            "(W' = W + (\u03bb \u2212 1)\u00b7\u03a3 \u03c3<sub>j</sub>u<sub>j</sub>v<sub>j</sub><sup>T</sup>); "
            "\u03bb = 1 is the LoRA model itself, \u03bb = 0 removes the intruders.</p>")
    plot = d.get("plots", {}).get("accuracy_vs_forgetting")
    return section("5. Scaling intruders: accuracy vs forgetting", "sweep", text + (figure(root, plot) if plot else "")
                    + table(["\u03bb", "matrices rescaled", "task accuracy", "drift from base"], rows))


def _eval_section(d: dict[str, Any]) -> str:
    labels = {"base": "base, untrained head (before)", "lora": "LoRA (after)", "full": "full fine-tuning (after)"}
    rows = [(labels.get(k, k), pct(v["accuracy"]), drift_text(v["drift"])) for k, v in d["eval"].items()]
    text = (f"<p>Task accuracy on the {d['data']['test']} held-out examples; forgetting as embedding drift: "
            f"mean 1 \u2212 cosine similarity between the base's and the model's sentence embeddings on "
            f"{d['data']['probe']} general sentences (0 = unchanged).</p>")
    return section("6. Evaluation: task skill and forgetting", "eval", text + table(["model", "task accuracy", "drift from base"], rows))


def _timing_section(d: dict[str, Any]) -> str:
    rows = [(s["title"], secs(s["seconds"])) for s in d["stages"]] + [("total", secs(d["total_seconds"]))]
    return section("Stage timings", "timings", table(["stage", "time"], rows))


def build_html(data: dict[str, Any], root: Path) -> str:
    """The report page for ``data`` (the parsed demo.json); plot paths are relative to ``root``."""
    parts = [_setup_section(data)]
    for key, render in (("finetune", _finetune_section), ("merge", _merge_section), ("diff", _diff_section)):
        if key in data:
            parts.append(render(data))
    if "intruders" in data:
        parts.append(_intruders_section(data, root))
    if data.get("sweep"):
        parts.append(_sweep_section(data, root))
    if "eval" in data:
        parts.append(_eval_section(data))
    parts.append(_timing_section(data))
    name = data["model"]["name"]
    return page(title=f"surgeon demo: {name}", heading="surgeon demo",
                subtitle=f"{name} fine-tuned on {data['data']['name']}: LoRA vs full fine-tuning, merge, task vectors, "
                         "intruder dimensions and their repair.",
                body=[cards(data.get("headline", [])), *parts],
                footer=f"surgeon {data['surgeon_version']} \u00b7 {data['created']} \u00b7 data: {JSON_NAME}",
                data=data, data_id="demo-data")


def write_report(data: dict[str, Any], out: Path) -> tuple[Path, Path, dict[str, dict[str, str]]]:
    """Render plots, write ``demo.json``, then build ``report.html`` from the JSON as written.

    ``data["plots"]`` may already name plots made by earlier stages (files under ``out``);
    the derived plots are added to it. Returns (html path, json path, plots).
    """
    plots = dict(data.get("plots", {}))
    plots.update(render_plots(data, out))
    body = {**data, "plots": plots}
    html_path, json_path = publish_report(body, out, build_html)
    return html_path, json_path, plots


def publish_report(body: dict[str, Any], out: Path, render: Callable[[dict[str, Any], Path], str], *,
                   json_name: str = JSON_NAME, html_name: str = HTML_NAME) -> tuple[Path, Path]:
    """Write the JSON, then the page rendered from the JSON as written, each atomically (the demo's
    own folder: replaced on a rerun). Returns (html path, json path)."""
    json_path, html_path = out / json_name, out / html_name
    write_side_output(json_path, json.dumps(body, indent=2) + "\n", overwrite=True, what="demo data")
    written = json.loads(json_path.read_text(encoding="utf-8"))
    write_side_output(html_path, render(written, out), overwrite=True, what="demo report")
    return html_path, json_path
