"""`surgeon demo`: the whole pipeline on a tiny BERT with toy data, and every artefact it writes.

The pipeline runs once per module (a few seconds); the tests then check that the
report, the JSON and the plots exist and agree, that the page is self-contained,
and (when Debian's chromium is installed) that it renders.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from surgeon.cli.main import cli
from surgeon.errors import CheckpointFormatError, DataError, OutputError
from surgeon.io.checkpoint import Checkpoint
from surgeon.workflows.demo.run import STAGES, DemoSettings, run_demo
from surgeon.workflows.demo.report import HTML_NAME, JSON_NAME, drift_text, pct

sys.path.insert(0, str(Path(__file__).parent))
from _finetune_helpers import build_model, lm_rows, sentiment_rows, write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = DemoSettings(epochs=3, batch_size=8, max_length=32, lora_rank=4, lora_alpha=8.0, lora_lr=1e-2, full_lr=1e-3,
                    lambdas=(0.0, 0.5, 1.0))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(report, parsed demo.json, html text, output folder) of one tiny demo run."""
    root = tmp_path_factory.mktemp("demo")
    model = build_model("bert", root / "tiny-bert")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", sentiment_rows(48, 0))
    write_jsonl(data / "test.jsonl", sentiment_rows(16, 1))
    write_jsonl(data / "probe.jsonl", lm_rows(8, 2))
    seen: list[tuple[int, str, float | None]] = []
    report = run_demo(root / "out", model=model, data=data, settings=TINY,
                      on_stage=lambda i, n, title, secs: seen.append((i, title, secs)))
    out = Path(report.output)
    body = json.loads((out / JSON_NAME).read_text("utf-8"))
    return report, body, (out / HTML_NAME).read_text("utf-8"), out, seen


class _Page(HTMLParser):
    """Collects every src/href and the embedded JSON of the report."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []
        self.embedded = ""
        self._in_data = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]
        self._in_data = tag == "script" and ("id", "demo-data") in attrs

    def handle_endtag(self, tag):
        self._in_data = False

    def handle_data(self, data):
        if self._in_data:
            self.embedded += data


def _text(html: str) -> str:
    """Visible text of the page (tags dropped, entities resolved), whitespace collapsed."""
    import html as _html

    body = re.sub(r"<script.*?</script>|<style.*?</style>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", _html.unescape(re.sub(r"<[^>]+>", " ", body)))


# -- the pipeline ran and every artefact is there ------------------------------------------------------

def test_every_stage_ran_and_was_timed(demo):
    report, body, _, _, seen = demo
    names = [s.name for s in STAGES]
    assert [s["name"] for s in body["stages"]] == names
    assert [t.name for t in report.stages] == names + ["report"]
    assert all(s["seconds"] > 0 for s in body["stages"])
    assert body["total_seconds"] >= sum(s["seconds"] for s in body["stages"])
    assert [(i, secs is None) for i, _, secs in seen] == [(i, flag) for i in range(1, len(names) + 1) for flag in (True, False)]


def test_artefacts_exist(demo):
    report, body, html, out, _ = demo
    assert Path(report.html) == out / HTML_NAME and Path(report.json) == out / JSON_NAME
    expected = {"intruders_per_layer", "epsilon_sweep", "accuracy_vs_forgetting"}
    assert expected <= set(body["plots"])
    assert any(k.startswith("similarity_") and k.endswith("_lora") for k in body["plots"])
    for plot in body["plots"].values():
        assert (out / plot["file"]).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(Path(p["file"]).name for p in body["plots"].values())
    assert sorted(report.plots) == sorted(p["file"] for p in body["plots"].values())
    for rel in ["models/base", "models/lora-adapter", "models/lora-merged", "models/full",
                *(p["output"] for p in body["sweep"])]:
        assert (out / rel).is_dir(), rel


def test_json_is_consistent(demo):
    _, body, _, out, _ = demo
    assert [p["lambda"] for p in body["sweep"]] == list(TINY.lambdas)
    intr = body["intruders"]
    for key in ("lora", "full"):
        assert sum(intr[key]["per_layer"]) <= intr[key]["total"]
        assert intr[key]["epsilon_sweep"][f"{TINY.epsilon:g}"] == intr[key]["total"]
    assert body["model"]["layers"] == 2 and body["data"]["train"] == 48 and body["data"]["test"] == 16
    assert set(body["eval"]) == {"base", "lora", "full"}
    assert body["eval"]["base"]["drift"] == pytest.approx(0.0, abs=1e-9)
    # merging the adapter is exactly the adapter: the diff's equivalence check says so
    check = body["diff"]["lora"]["adapter_check"]
    assert check["passed"] and check["targets"] > 0
    # lambda = 1 changes nothing: same accuracy and drift as the merged LoRA model
    one = next(p for p in body["sweep"] if p["lambda"] == 1.0)
    assert one["scaled"] == 0
    assert one["accuracy"] == body["eval"]["lora"]["accuracy"]
    assert one["drift"] == pytest.approx(body["eval"]["lora"]["drift"], abs=1e-9)


def test_task_base_is_the_encoder_byte_for_byte(demo):
    _, body, _, out, _ = demo
    with Checkpoint.open(body["model"]["path"]) as src, Checkpoint.open(out / "models" / "base") as base:
        for name in src.keys():
            assert base.read_raw(f"bert.{name}") == src.read_raw(name)
        assert sorted(set(base.keys()) - {f"bert.{n}" for n in src.keys()}) == ["classifier.bias", "classifier.weight"]
        assert torch.equal(base.get("classifier.bias"), torch.zeros(2))
    config = json.loads((out / "models" / "base" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"}


# -- the page agrees with the JSON -------------------------------------------------------------------

def test_html_embeds_exactly_the_json(demo):
    _, body, html, _, _ = demo
    page = _Page()
    page.feed(html)
    assert json.loads(page.embedded) == body


def test_html_is_self_contained(demo):
    _, body, html, out, _ = demo
    page = _Page()
    page.feed(html)
    assert "link" not in page.tags and "iframe" not in page.tags
    assert page.refs and all(ref.startswith("data:image/png;base64,") for ref in page.refs)
    embedded = {base64.b64decode(ref.split(",", 1)[1]) for ref in page.refs}
    assert embedded == {(out / p["file"]).read_bytes() for p in body["plots"].values()}
    assert "url(" not in html and "@import" not in html


def test_html_shows_the_json_numbers(demo):
    _, body, html, _, _ = demo
    text = _text(html)
    for card in body["headline"]:
        assert f"{card['text']} {card['label']}" in text
    for point in body["sweep"]:
        assert f"{point['lambda']:g} {point['scaled']} {pct(point['accuracy'])} {drift_text(point['drift'])}" in text
    for key, label in (("base", "base, untrained head (before)"), ("lora", "LoRA (after)"), ("full", "full fine-tuning (after)")):
        ev = body["eval"][key]
        assert f"{label} {pct(ev['accuracy'])} {drift_text(ev['drift'])}" in text
    intr = body["intruders"]
    assert f"LoRA {intr['lora']['total']} {intr['lora']['matrices_with_intruders']} / {intr['lora']['matrices']}" in text
    lora_ft = body["finetune"]["lora"]
    assert f"{lora_ft['method']} {lora_ft['trainable_parameters']:,}" in text


def test_headline_numbers_come_from_the_results(demo):
    _, body, _, _, _ = demo
    cards = {c["key"]: c for c in body["headline"]}
    ev, intr = body["eval"], body["intruders"]
    assert cards["accuracy"]["text"] == f"{pct(ev['lora']['accuracy'])} / {pct(ev['full']['accuracy'])}"
    assert cards["intruders"]["text"] == f"{intr['lora']['total']} vs {intr['full']['total']}"
    assert cards["adapter_check"]["detail"] == "passed"


# -- errors and the CLI ----------------------------------------------------------------------------------

def test_refuses_an_output_folder_inside_the_model(tiny_bert):
    with pytest.raises(OutputError) as err:
        run_demo(tiny_bert / "demo", model=tiny_bert)
    assert str(err.value) == (f"{(tiny_bert / 'demo').resolve()}: the demo output folder overlaps its input "
                              f"{tiny_bert.resolve()}; choose another -o folder.")
    assert not (tiny_bert / "demo").exists()


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = CliRunner().invoke(cli, ["demo", "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output == (f"Error: {tmp_path.resolve()}: folder is not empty; choose a new -o folder "
                             "or pass --overwrite to replace it.\n")
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_refuses_a_model_that_is_not_a_bert_encoder(tmp_path, tiny_llama):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", sentiment_rows(8, 0))
    write_jsonl(data / "test.jsonl", sentiment_rows(4, 1))
    write_jsonl(data / "probe.jsonl", lm_rows(2, 2))
    with pytest.raises(CheckpointFormatError) as err:
        run_demo(tmp_path / "out", model=tiny_llama, data=data, settings=TINY)
    assert str(err.value) == (
        f"{tiny_llama}: the demo needs a bare BERT encoder (BertModel, like all-MiniLM-L6-v2) with config.json; "
        "found model_type 'llama'. Pass a BertModel folder as the model.")


def test_refuses_data_folder_without_the_three_files(tmp_path, tiny_llama):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", sentiment_rows(8, 0))
    with pytest.raises(DataError) as err:
        run_demo(tmp_path / "out", model=tiny_llama, data=tmp_path / "data", settings=TINY)
    assert str(err.value).startswith(f"{tmp_path / 'data'}: demo data needs train.jsonl, test.jsonl, probe.jsonl; missing ")


def test_help_ends_with_an_example():
    result = CliRunner().invoke(cli, ["demo", "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "surgeon demo -o surgeon-demo" in result.output


# -- the page renders in a real browser -------------------------------------------------------------------

def test_report_renders_in_headless_chromium(demo, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from screenshot_report import find_browser, screenshot

    if find_browser() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); CI does not install it")
    _, _, _, out, _ = demo
    png = screenshot(out / HTML_NAME, tmp_path / "report.png", width=1280, height=2400)
    from PIL import Image

    image = Image.open(png).convert("RGB")
    assert image.size == (1280, 2400)
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 200  # text, plots and cards, not a blank or error page
    # the header band is the page background, not Chromium's white "file not found" page
    assert image.getpixel((5, 5)) == (0xF5, 0xF6, 0xF8)


# -- the examples run on the demo's models ------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _private_svd_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGEON_CACHE_DIR", str(tmp_path / "svd-cache"))


def _example(name: str):
    sys.path.insert(0, str(REPO / "examples"))
    return __import__(name)


def test_scale_intruders_example_on_the_demo_models(demo, tmp_path):
    flow = _example("scale_intruders_flow")
    _, body, _, out, _ = demo
    probe = out.parent / "data" / "probe.jsonl"
    result = flow.run_flow(out / "models" / "lora-merged", out / "models" / "base", 0.0, tmp_path, data=probe)
    zero = next(p for p in body["sweep"] if p["lambda"] == 0.0)
    assert result["before"] == body["intruders"]["lora"]["total"]
    assert result["scaled"] == zero["scaled"]
    assert result["drift_before"] == pytest.approx(body["eval"]["lora"]["drift"], abs=1e-6)
    assert result["drift_after"] == pytest.approx(zero["drift"], abs=1e-6)
    with Checkpoint.open(result["output"]) as mine, Checkpoint.open(out / zero["output"]) as demo_model:
        assert all(mine.read_raw(n) == demo_model.read_raw(n) for n in demo_model.keys())


def test_scale_intruders_example_finds_and_removes_planted_intruders(tmp_path):
    flow = _example("scale_intruders_flow")
    base = build_model("bert", tmp_path / "base")
    tuned = flow.plant_intruders(base, tmp_path / "planted")
    result = flow.run_flow(tuned, base, 0.0, tmp_path / "work")
    assert result["scaled"] == 4  # query and value of both layers
    assert result["before"] >= 4 and result["after"] < result["before"]


def test_task_vectors_example_on_the_demo_models(demo, tmp_path):
    flow = _example("task_vectors_flow")
    _, body, _, out, _ = demo
    models = out / "models"
    result = flow.run_flow(models / "base", [models / "full", models / "lora-merged"], [0.5, 0.5], tmp_path)
    assert result["changed"] == [body["diff"]["full"]["changed"], body["diff"]["lora"]["changed"]]
    assert result["max_error"] <= 1e-6
    assert (tmp_path / "combined" / "config.json").is_file()


def test_task_vectors_example_planted_changes_touch_only_their_layers(tmp_path):
    flow = _example("task_vectors_flow")
    base = build_model("bert", tmp_path / "base")
    tuned = flow.plant_changes(base, tmp_path / "tuned", layers=[1])
    result = flow.run_flow(base, [tuned], [1.0], tmp_path / "work")
    assert result["changed"] == [6]  # query, key, value, attention output, intermediate, output of layer 1
    assert result["max_error"] == 0.0


def test_best_tradeoff_keeps_accuracy_and_minimizes_drift():
    from surgeon.workflows.demo.run import best_tradeoff

    sweep = [{"lambda": 0.0, "accuracy": 0.51, "drift": 0.5}, {"lambda": 0.25, "accuracy": 0.825, "drift": 0.57},
             {"lambda": 0.5, "accuracy": 0.8625, "drift": 0.70}, {"lambda": 1.0, "accuracy": 0.8625, "drift": 0.90}]
    assert best_tradeoff(sweep, 0.8625)["lambda"] == 0.5
    assert best_tradeoff(sweep, 0.83)["lambda"] == 0.25
    assert best_tradeoff(sweep, 0.99)["lambda"] == 0.0  # nothing keeps the accuracy: least drift overall
