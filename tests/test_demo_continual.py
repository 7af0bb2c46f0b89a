"""`surgeon demo --continual` on a tiny BERT and toy tasks: every number checked against an independent reading.

The run happens once per module. References: transformers (and peft for the LoRA
stages) loading the stage models themselves, with the earlier task's head copied in by
hand, for the forgetting matrix; `surgeon intruders` run alone on each stage for the
per-stage counts; and the page itself (self-contained, renders in headless Chromium).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from _finetune_helpers import build_model, sentiment_rows, topic_rows, write_jsonl
from _page_helpers import embedded, images, rendered, self_contained
from surgeon.cli.main import cli
from surgeon.io.output import output_guard
from surgeon.workflows.demo.continual import ContinualSettings
from surgeon.workflows.demo.continual_report import HTML_NAME, JSON_NAME
from surgeon.workflows.demo.run import run_continual_demo
from surgeon.workflows.spectral.intruders import IntruderOptions, find_intruders

TINY = ContinualSettings(epochs=5, batch_size=8, lora_rank=4, lora_alpha=8.0, lora_lr=1e-2, full_lr=2e-3,
                         lambdas=(0.0, 0.5), threads=1)


def _flipped(rows: list[dict]) -> list[dict]:
    """The sentiment cue with the opposite meaning: a third task that undoes the first (forgetting shows)."""
    return [{"text": r["text"], "label": "down" if r["label"] == "positive" else "up"} for r in rows]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    model = build_model("bert", root / "bert")
    d = root / "data"
    d.mkdir()
    tasks = [("sent", write_jsonl(d / "a.jsonl", sentiment_rows(64, 0)), write_jsonl(d / "b.jsonl", sentiment_rows(12, 1))),
             ("topic", write_jsonl(d / "c.jsonl", topic_rows(48, 0)), write_jsonl(d / "d.jsonl", topic_rows(12, 1))),
             ("flip", write_jsonl(d / "e.jsonl", _flipped(sentiment_rows(64, 3))),
              write_jsonl(d / "f.jsonl", _flipped(sentiment_rows(12, 4))))]
    threads = torch.get_num_threads()
    with output_guard():  # as the CLI runs it: every input noted, never written over
        report = run_continual_demo(root / "out", model=model, tasks=tasks, settings=TINY)
    assert torch.get_num_threads() == threads  # the run's thread count is restored
    out = Path(report.output)
    return report, json.loads((out / JSON_NAME).read_text("utf-8")), out, tasks


def _classifier(folder: Path, adapter: Path | None = None):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


def _accuracy(encoder, head, tokenizer_dir: Path, data: Path) -> float:
    """``encoder``'s prediction with ``head``'s classifier copied in (and its labels)."""
    from transformers import AutoTokenizer

    encoder.classifier = head.classifier
    labels = [head.config.id2label[i] for i in range(head.config.num_labels)]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    with torch.no_grad():
        batch = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
        pred = encoder(**batch).logits.argmax(-1)
    return float((pred == torch.tensor([labels.index(r["label"]) for r in rows])).float().mean())


def test_forgetting_matrix_matches_transformers_with_the_head_copied_in(demo):
    _, body, out, tasks = demo
    models = out / "models"
    for s in range(1, 4):
        for t in range(1, s + 1):
            full = _accuracy(_classifier(models / f"full-{s}"), _classifier(models / f"full-{t}"), models / "full-1",
                             tasks[t - 1][2])
            lora = _accuracy(_classifier(models / f"base-{tasks[s - 1][0]}", models / f"lora-adapter-{s}"),
                             _classifier(models / f"base-{tasks[t - 1][0]}", models / f"lora-adapter-{t}"),
                             models / "full-1", tasks[t - 1][2])
            assert body["eval"]["full"]["accuracy"][s - 1][t - 1] == pytest.approx(full), (s, t)
            assert body["eval"]["lora"]["accuracy"][s - 1][t - 1] == pytest.approx(lora), (s, t)
        assert body["eval"]["lora"]["accuracy"][s - 1][s:] == [None] * (3 - s)
    for method in ("lora", "full"):
        acc = body["eval"][method]["accuracy"]
        assert body["eval"][method]["forgetting"] == pytest.approx([acc[0][0] - acc[2][0], acc[1][1] - acc[2][1]])


def test_drift_matches_surgeon_eval_drift_from(demo):
    """The demo embeds the base once and reads each model once; `surgeon eval --drift-from` loads both each time."""
    from surgeon.workflows.train.evaluate import evaluate

    _, body, out, _ = demo
    probe, base = out / "data" / "probe.jsonl", out / "models" / "base-sent"
    for method in ("lora", "full"):
        for s in range(1, 4):
            r = evaluate(out / "models" / f"{method}-{s}", data=probe, drift_from=base, batch_size=7, max_length=32,
                         device="cpu")
            assert body["eval"][method]["drift"][s - 1] == pytest.approx(1.0 - r.drift.mean_cosine, abs=1e-6)
    for point in body["scale"]["points"]:
        r = evaluate(out / point["output"], data=probe, drift_from=base, max_length=32, device="cpu")
        assert point["drift"] == pytest.approx(1.0 - r.drift.mean_cosine, abs=1e-6)


def test_intruders_per_stage_equal_separate_runs(demo):
    _, body, out, tasks = demo
    base = out / "models" / f"base-{tasks[0][0]}"
    for method in ("lora", "full"):
        per_stage = body["intruders"][method]["per_stage"]
        for s, row in enumerate(per_stage, 1):
            alone = find_intruders(out / "models" / f"{method}-{s}", base, use_cache=False,
                                   options=IntruderOptions(epsilon=TINY.epsilon, top_k=TINY.top_k))
            assert row["intruders"] == alone.totals["intruders"]
            assert row["new"] + row["persisting"] == row["intruders"]
        assert [r["cumulative"] for r in per_stage] == list(
            __import__("itertools").accumulate(r["new"] for r in per_stage))
    assert body["intruders"]["lora"]["per_stage"][0]["intruders"] > 0
    assert max(body["eval"]["full"]["accuracy"][0][0], body["eval"]["lora"]["accuracy"][0][0]) > 0.7  # learnt


def test_scaling_points_and_report(demo, tmp_path):
    report, body, out, tasks = demo
    points = body["scale"]["points"]
    assert [p["lambda"] for p in points] == [0.0, 0.5]
    assert all(len(p["accuracy"]) == 3 and p["scaled"] == body["intruders"]["lora"]["per_stage"][-1]["intruders"]
               for p in points)
    models = out / "models"
    for point in points:  # the scaled encoder read out with each task's LoRA head, by transformers + peft
        scaled = out / point["output"]
        heads = [_classifier(models / f"base-{tasks[t][0]}", models / f"lora-adapter-{t + 1}") for t in range(2)]
        heads.append(_classifier(scaled))
        for t, head in enumerate(heads):
            assert point["accuracy"][t] == pytest.approx(_accuracy(_classifier(scaled), head, models / "full-1",
                                                                   tasks[t][2])), (point["lambda"], t)
    text = (out / HTML_NAME).read_text("utf-8")
    self_contained(text)
    assert len(images(text)) == 3
    assert embedded(text, "demo-data") == body
    assert [h["key"] for h in report.headline] == ["first_task", "forgetting", "intruders", "scale", "drift", "time"]
    assert "1 torch thread," in body["machine"]
    assert all(s["cpu_seconds"] >= 0 for s in body["stages"])
    assert sum(s["cpu_seconds"] for s in body["stages"]) <= body["cpu_seconds"] + 1e-6
    assert not [p for p in (out / "models").iterdir() if p.name.startswith("head-swap")]
    rendered(out / HTML_NAME, tmp_path)


def test_cli_help_names_the_continual_demo():
    result = CliRunner().invoke(cli, ["demo", "--help"])
    assert result.exit_code == 0 and "--continual" in result.output
