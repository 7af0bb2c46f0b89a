"""`surgeon eval MODEL --data A --data B`: each data file reported, against transformers' own predictions."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from _finetune_helpers import build_model, sentiment_rows, write_jsonl
from surgeon.cli.main import cli
from surgeon.workflows.train.finetune import FinetuneOptions, finetune


def _reference_accuracy(model_dir, data) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    with torch.no_grad():
        pred = model(**tok([r["text"] for r in rows], padding=True, return_tensors="pt")).logits.argmax(-1)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return float((pred == torch.tensor([labels.index(r["label"]) for r in rows])).float().mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evmany")
    base = build_model("bert", root / "bert")
    train = write_jsonl(root / "train.jsonl", sentiment_rows(32, 0))
    full = root / "full"
    finetune(FinetuneOptions(base=str(base), data=str(train), out=str(full), method="full", epochs=2, batch_size=8,
                             lr=1e-3))
    sets = [write_jsonl(root / f"eval{i}.jsonl", sentiment_rows(n, seed)) for i, (n, seed) in enumerate([(16, 1), (10, 5)])]
    return base, full, sets


def test_each_data_file_is_reported(trained):
    base, full, sets = trained
    runner = CliRunner()
    args = ["eval", str(full), "--task", "classification", *[a for s in sets for a in ("--data", str(s))]]
    result = runner.invoke(cli, [*args, "--drift-from", str(base), "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert [r["data"] for r in body["reports"]] == [str(s) for s in sets]
    assert [r["metrics"]["examples"] for r in body["reports"]] == [16, 10]
    for report, data in zip(body["reports"], sets):
        assert report["metrics"]["accuracy"] == pytest.approx(_reference_accuracy(full, data))
        assert report["drift"]["texts"] == len(data.read_text().splitlines())
    text = runner.invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert text.output.count("accuracy:") == 3  # one per file, then the summary line
    one = runner.invoke(cli, ["eval", str(full), "--task", "classification", "--data", str(sets[0]), "--json"])
    assert "reports" not in json.loads(one.stdout)  # one file: today's document
