"""The demo's artefacts: ``demo.json``, plots (PNG) and a self-contained ``report.html``.

The HTML is built only from the JSON as written to disk and the plot files it
names, so the page and the data cannot disagree. The page has no external
assets: CSS is inline, plots are embedded as base64 ``data:`` URIs, and the
JSON itself is embedded in a ``<script type="application/json">`` block.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

JSON_NAME = "demo.json"
HTML_NAME = "report.html"
PLOTS_DIR = "plots"
LORA_COLOR, FULL_COLOR, BASE_COLOR = "#2f6fb0", "#d0672f", "#6b6b6b"


# -- formatting (shared with the CLI summary through the JSON's "headline") ------------------------
def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if x == 0:
        return "0"  # also -0.0
    if abs(x) < 10 ** -(digits - 1) or abs(x) >= 1e5:
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def drift_text(x: float | None) -> str:
    """Embedding drift (1 - mean cosine) with four decimals."""
    return "n/a" if x is None else f"{x:.4f}"


def secs(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:.1f} s" if x < 120 else f"{int(x // 60)} min {x % 60:.0f} s")


# -- plots -----------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_intruders_per_layer(data: dict[str, Any], path: Path) -> None:
    """Grouped bars: intruder dimensions per transformer layer, LoRA vs full fine-tuning."""
    plt = _pyplot()
    intr = data["intruders"]
    layers = intr["layers"]
    lora, full = intr["lora"]["per_layer"], intr["full"]["per_layer"]
    xs = range(len(layers))
    fig, ax = plt.subplots(figsize=(7.0, 3.4), dpi=110)
    w = 0.38
    ax.bar([x - w / 2 for x in xs], lora, w, label=f"LoRA (total {intr['lora']['total']})", color=LORA_COLOR)
    ax.bar([x + w / 2 for x in xs], full, w, label=f"full fine-tuning (total {intr['full']['total']})", color=FULL_COLOR)
    ax.set_xticks(list(xs), [str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("intruder dimensions")
    ax.set_title(f"Intruder dimensions per layer (top-{intr['top_k']}, \u03b5 = {intr['epsilon']})", fontsize=10)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(frameon=False, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_epsilon_sweep(data: dict[str, Any], path: Path) -> None:
    """Total intruder count against the threshold epsilon, LoRA vs full fine-tuning."""
    plt = _pyplot()
    intr = data["intruders"]
    fig, ax = plt.subplots(figsize=(7.0, 3.0), dpi=110)
    for key, color, label in (("lora", LORA_COLOR, "LoRA"), ("full", FULL_COLOR, "full fine-tuning")):
        sweep = intr[key]["epsilon_sweep"]
        eps = sorted(sweep, key=float)
        ax.plot([float(e) for e in eps], [sweep[e] for e in eps], "o-", color=color, label=label)
    ax.axvline(intr["epsilon"], color=BASE_COLOR, lw=0.8, ls=":")
    ax.set_xlabel("ε (a tuned direction is an intruder when its best |cos| to the base is below ε)")
    ax.set_ylabel("intruders (all matrices)")
    ax.set_title("Intruder count against ε", fontsize=10)
    ax.legend(frameon=False, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_tradeoff(data: dict[str, Any], path: Path) -> None:
    """Left: accuracy and drift against lambda. Right: accuracy against drift, one point per lambda."""
    plt = _pyplot()
    sweep, ev = data["sweep"], data["eval"]
    lam = [p["lambda"] for p in sweep]
    acc = [100 * p["accuracy"] for p in sweep]
    drift = [p["drift"] for p in sweep]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.0, 3.6), dpi=110)
    ax1.plot(lam, acc, "o-", color=LORA_COLOR, label="task accuracy")
    ax1.set_xlabel("\u03bb (intruder singular values scaled by \u03bb)")
    ax1.set_ylabel("task accuracy (%)", color=LORA_COLOR)
    ax1b = ax1.twinx()
    ax1b.plot(lam, drift, "s--", color=FULL_COLOR, label="embedding drift")
    ax1b.set_ylabel("drift from base (1 \u2212 cos)", color=FULL_COLOR)
    ax1.set_title("LoRA model as \u03bb varies", fontsize=10)
    ax2.plot(drift, acc, "o-", color=LORA_COLOR, label="LoRA, scaled intruders")
    for i, (x, y, lm) in enumerate(zip(drift, acc, lam)):
        ax2.annotate(f"\u03bb={lm:g}", (x, y), textcoords="offset points", xytext=(4, 6 if i % 2 else -12), fontsize=8)
    for key, color, label in (("base", BASE_COLOR, "base"), ("full", FULL_COLOR, "full fine-tuning")):
        if key in ev:
            ax2.plot([ev[key]["drift"]], [100 * ev[key]["accuracy"]], "D", color=color, label=label)
    ax2.set_xlabel("forgetting: embedding drift from base (1 \u2212 cos)")
    ax2.set_ylabel("task accuracy (%)")
    ax2.set_title("Accuracy vs forgetting", fontsize=10)
    ax2.legend(frameon=True, framealpha=0.9, fontsize=8, loc="best")
    for ax in (ax1, ax2):
        ax.spines[["top"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_plots(data: dict[str, Any], out: Path) -> dict[str, dict[str, str]]:
    """Draw the plots that derive from the data; return {name: {file, caption}} (paths relative to out)."""
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    made: dict[str, dict[str, str]] = {}
    if {"lora", "full"} <= set(data.get("intruders", {})):
        rel = f"{PLOTS_DIR}/intruders_per_layer.png"
        plot_intruders_per_layer(data, out / rel)
        made["intruders_per_layer"] = {"file": rel, "caption": "Intruder dimensions per layer, LoRA vs full fine-tuning."}
    if {"lora", "full"} <= set(data.get("intruders", {})):
        rel = f"{PLOTS_DIR}/epsilon_sweep.png"
        plot_epsilon_sweep(data, out / rel)
        made["epsilon_sweep"] = {"file": rel, "caption": "Intruder count against the threshold ε, LoRA vs full fine-tuning."}
    if data.get("sweep") and data.get("eval"):
        rel = f"{PLOTS_DIR}/accuracy_vs_forgetting.png"
        plot_tradeoff(data, out / rel)
        made["accuracy_vs_forgetting"] = {
            "file": rel, "caption": "Task accuracy and forgetting of the LoRA model as its intruder dimensions are scaled by \u03bb."}
    return made


# -- HTML ------------------------------------------------------------------------------------------
_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f5f6f8;color:#1d232b}
main{max-width:1120px;margin:0 auto;padding:28px 32px 48px}
h1{font-size:28px;margin:0 0 4px}h2{font-size:20px;margin:0 0 10px;border-bottom:2px solid #e3e6ea;padding-bottom:6px}
.sub{color:#5b6572;margin:0 0 22px}
.cards{display:grid;grid-template-columns:repeat(3,1fr);gap:12px;margin-bottom:26px}
.card{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
.card .v{font-size:26px;font-weight:650;color:#17437a}.card .l{font-size:13px;color:#3d4754;margin-top:2px}
.card .d{font-size:12px;color:#7a8490;margin-top:4px}
section{background:#fff;border-radius:10px;padding:18px 22px;margin-bottom:18px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
section p{line-height:1.5;margin:6px 0 10px}
table{border-collapse:collapse;font-size:14px;margin:8px 0 6px}
th,td{padding:5px 12px;border-bottom:1px solid #e7e9ec;text-align:right}th{background:#f0f2f5;font-weight:600}
th:first-child,td:first-child{text-align:left}
.kv th{background:none;font-weight:500;color:#3d4754}.kv td{text-align:left}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #e7e9ec;border-radius:6px}
figcaption{font-size:13px;color:#5b6572;margin-top:4px}
.ok{color:#1d7a3a;font-weight:600}.bad{color:#b3261e;font-weight:600}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:12px 28px;align-items:start}
code{background:#f0f2f5;padding:1px 5px;border-radius:4px;font-size:13px}
footer{color:#7a8490;font-size:12px;margin-top:20px}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _figure(root: Path, plot: dict[str, str]) -> str:
    raw = (root / plot["file"]).read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(raw).decode("ascii")
    return (f'<figure data-file="{_e(plot["file"])}"><img alt="{_e(plot["caption"])}" src="{uri}">'
            f"<figcaption>{_e(plot['caption'])}</figcaption></figure>")


def _cards(data: dict[str, Any]) -> str:
    cards = [
        f'<div class="card" data-key="{_e(h["key"])}"><div class="v">{_e(h["text"])}</div>'
        f'<div class="l">{_e(h["label"])}</div><div class="d">{_e(h.get("detail", ""))}</div></div>'
        for h in data.get("headline", [])
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def _section(title: str, anchor: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


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
    return _section("Setup", "setup", text + f'<div class="grid2">{_kv(rows)}{_kv(knobs)}</div>')


def _finetune_section(d: dict[str, Any]) -> str:
    rows = [(r["method"], f"{r['trainable_parameters']:,}", r["epochs"], r["steps"], num(r["final_loss"]), secs(r["seconds"]), r["output"])
            for r in (d["finetune"][k] for k in ("lora", "full") if k in d["finetune"])]
    text = ("<p>The same data, the same number of epochs: a low-rank adapter on the attention and MLP matrices, "
            "and full fine-tuning of every weight.</p>")
    return _section("1. Fine-tuning", "finetune", text + _table(["method", "trainable params", "epochs", "steps", "final loss", "time", "output"], rows))


def _merge_section(d: dict[str, Any]) -> str:
    m = d["merge"]
    rows = [("output", m["output"]), ("dtype", m["dtype"]), ("tensors merged (W + s\u00b7B\u00b7A)", m["merged"]),
            ("tensors replaced (the trained head)", m["replaced"]), ("tensors copied byte for byte", m["copied"]),
            ("time", secs(m["seconds"]))]
    return _section("2. Merge", "merge", "<p>The LoRA adapter merged into the base, tensor by tensor, one rounding.</p>" + _kv(rows))


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
    return _section("3. Diff: task vectors", "diff", text + _table(
        ["model", "changed tensors", "rounding only", "unchanged", "\u2016\u03c4\u2016", "adapter equivalence"], rows))


def _intruders_section(d: dict[str, Any], root: Path) -> str:
    intr, plots = d["intruders"], d.get("plots", {})
    rows = [(label, intr[k]["total"], f"{intr[k]['matrices_with_intruders']} / {intr[k]['matrices']}")
            for k, label in (("lora", "LoRA"), ("full", "full fine-tuning")) if k in intr]
    text = (f"<p>A left singular vector among the top-{intr['top_k']} of a fine-tuned matrix is an <em>intruder</em> when its "
            f"cosine similarity to every singular vector of the base matrix stays below \u03b5 = {intr['epsilon']} "
            "(arXiv 2410.21228). LoRA tends to introduce them; full fine-tuning mostly does not.</p>")
    modules = sorted(set(intr["lora"]["per_module"]) | set(intr["full"]["per_module"]))
    by_module = _table(["module type", "LoRA", "full fine-tuning"],
                       [(m, intr["lora"]["per_module"].get(m, 0), intr["full"]["per_module"].get(m, 0)) for m in modules])
    figs = "".join(_figure(root, plots[n]) for n in ("intruders_per_layer", "epsilon_sweep") if n in plots)
    sims = sorted((n for n in plots if n.startswith("similarity_")), key=lambda n: (n.split("_")[1], n.endswith("full")))
    sim_text = ("<p>Similarity matrices of the LoRA model's matrices with the most intruder energy, "
                "and of the same matrices after full fine-tuning.</p>") if sims else ""
    return _section("4. Intruder dimensions", "intruders",
                    text + '<div class="grid2">' + _table(["model", "intruders", "matrices with intruders"], rows)
                    + by_module + "</div>" + figs + sim_text + "".join(_figure(root, plots[n]) for n in sims))


def _sweep_section(d: dict[str, Any], root: Path) -> str:
    rows = [(f"{p['lambda']:g}", p["scaled"], pct(p["accuracy"]), drift_text(p["drift"])) for p in d["sweep"]]
    text = ("<p>Each intruder's singular value of the LoRA model is multiplied by \u03bb "
            "(W' = W + (\u03bb \u2212 1)\u00b7\u03a3 \u03c3<sub>j</sub>u<sub>j</sub>v<sub>j</sub><sup>T</sup>); "
            "\u03bb = 1 is the LoRA model itself, \u03bb = 0 removes the intruders.</p>")
    plot = d.get("plots", {}).get("accuracy_vs_forgetting")
    return _section("5. Scaling intruders: accuracy vs forgetting", "sweep", text + (_figure(root, plot) if plot else "")
                    + _table(["\u03bb", "matrices rescaled", "task accuracy", "drift from base"], rows))


def _eval_section(d: dict[str, Any]) -> str:
    labels = {"base": "base, untrained head (before)", "lora": "LoRA (after)", "full": "full fine-tuning (after)"}
    rows = [(labels.get(k, k), pct(v["accuracy"]), drift_text(v["drift"])) for k, v in d["eval"].items()]
    text = (f"<p>Task accuracy on the {d['data']['test']} held-out examples; forgetting as embedding drift: "
            f"mean 1 \u2212 cosine similarity between the base's and the model's sentence embeddings on "
            f"{d['data']['probe']} general sentences (0 = unchanged).</p>")
    return _section("6. Evaluation: task skill and forgetting", "eval", text + _table(["model", "task accuracy", "drift from base"], rows))


def _timing_section(d: dict[str, Any]) -> str:
    rows = [(s["title"], secs(s["seconds"])) for s in d["stages"]] + [("total", secs(d["total_seconds"]))]
    return _section("Stage timings", "timings", _table(["stage", "time"], rows))


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
    embedded = json.dumps(data, sort_keys=True).replace("</", "<\\/")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>surgeon demo: {_e(data['model']['name'])}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>surgeon demo</h1><p class=\"sub\">{_e(data['model']['name'])} fine-tuned on {_e(data['data']['name'])}: "
        "LoRA vs full fine-tuning, merge, task vectors, intruder dimensions and their repair.</p>"
        + _cards(data) + "".join(parts)
        + f"<footer>surgeon {_e(data['surgeon_version'])} \u00b7 {_e(data['created'])} \u00b7 data: {JSON_NAME}</footer>"
        + f'<script type="application/json" id="demo-data">{embedded}</script></main></body></html>\n'
    )


def write_report(data: dict[str, Any], out: Path) -> tuple[Path, Path, dict[str, dict[str, str]]]:
    """Render plots, write ``demo.json``, then build ``report.html`` from the JSON as written.

    ``data["plots"]`` may already name plots made by earlier stages (files under ``out``);
    the derived plots are added to it. Returns (html path, json path, plots).
    """
    plots = dict(data.get("plots", {}))
    plots.update(render_plots(data, out))
    body = {**data, "plots": plots}
    json_path = out / JSON_NAME
    json_path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    written = json.loads(json_path.read_text(encoding="utf-8"))
    html_path = out / HTML_NAME
    html_path.write_text(build_html(written, out), encoding="utf-8")
    return html_path, json_path, plots
