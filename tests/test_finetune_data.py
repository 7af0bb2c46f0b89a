"""Training/eval data files: formats, and one clear error per kind of bad file."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from surgeon.cli.main import cli
from surgeon.errors import DataError
from surgeon.io.data import load_task_data


def test_jsonl_classification(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a good day", "label": "pos"}\n\n{"text": "bad", "label": "neg", "extra": 1}\n')
    data = load_task_data(f, "classification")
    assert data.texts == ["a good day", "bad"]
    assert data.labels == ("neg", "pos")
    assert data.label_ids(data.labels) == [1, 0]


def test_csv_with_numeric_labels_sorted_as_numbers(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('text,label\n"one, with comma",10\ntwo,2\nthree,0\n')
    data = load_task_data(f, "classification")
    assert data.labels == ("0", "2", "10")
    assert data.texts[0] == "one, with comma"


def test_causal_text_and_prompt_completion(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "hello"}\n{"prompt": "Q: 2+2? A:", "completion": " 4"}\n')
    data = load_task_data(f, "causal-lm")
    assert data.examples[0].prompt is None
    assert (data.examples[1].prompt, data.examples[1].completion, data.examples[1].text) == ("Q: 2+2? A:", " 4", "Q: 2+2? A: 4")
    assert data.labels is None


@pytest.mark.parametrize("content,suffix,task,message", [
    ('{"text": "x"}\n', ".jsonl", "classification",
     "{f}: line 1 has no 'label' column (found: text); classification data needs 'text' and 'label' columns."),
    ('{"label": "a"}\n', ".jsonl", "classification",
     "{f}: line 1 has no 'text' column (found: label); classification data needs 'text' and 'label' columns."),
    ("text,label\n", ".csv", "classification",
     "{f}: holds no examples (the file is empty); give a file with one example per line."),
    ("", ".jsonl", "causal-lm", "{f}: holds no examples (the file is empty); give a file with one example per line."),
    ('{"prompt": "x"}\n', ".jsonl", "causal-lm",
     "{f}: line 1 has no 'completion' column (found: prompt); causal-LM data needs 'text', or 'prompt' and 'completion' columns."),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', ".jsonl", "classification",
     "{f}: every example has label 'x'; classification needs at least two labels."),
    ('{"text": "a", "label": "x"}\nnot json\n', ".jsonl", "classification",
     "{f}: line 2 is not valid JSON (Expecting value); write one JSON object per line."),
    ('{"text": "  ", "label": "x"}\n', ".jsonl", "classification", "{f}: line 1: 'text' is empty; remove the line or fill it in."),
    ('["a"]\n', ".jsonl", "causal-lm", "{f}: line 1 is a JSON str, not an object; write lines like {{\"text\": \"...\", \"label\": \"...\"}}."),
    ("text\n", ".txt", "causal-lm", "{f}: unknown data format '.txt'; use .jsonl (one JSON object a line) or .csv with a header row."),
])
def test_bad_data_is_refused(tmp_path, content, suffix, task, message):
    f = tmp_path / f"d{suffix}"
    f.write_text(content)
    with pytest.raises(DataError) as err:
        load_task_data(f, task)
    assert str(err.value) == message.format(f=f)


def test_unknown_eval_label(tmp_path):
    f = tmp_path / "eval.csv"
    f.write_text("text,label\nfine,pos\nmeh,neutral\n")
    with pytest.raises(DataError) as err:
        load_task_data(f, "classification", labels=("neg", "pos"))
    assert str(err.value) == (f"{f}: line 3: label 'neutral' is not among the training labels (neg, pos); "
                              "fix the label or add examples of it to the training data.")


def test_cli_reports_bad_data_before_loading_any_model(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "no label here"}\n')
    out = tmp_path / "out"
    base = tmp_path / "no-model"
    base.mkdir()
    (base / "config.json").write_text("{}")
    result = CliRunner().invoke(cli, ["finetune", str(base), "--data", str(data), "-o", str(out)])
    assert result.exit_code == 1
    assert f"Error: {base}: no .safetensors weights in this folder" in result.output


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError) as err:
        load_task_data(tmp_path / "nope.jsonl", "classification")
    assert str(err.value) == f"{tmp_path / 'nope.jsonl'}: no such data file; check the path."


def test_bundled_task_files():
    from surgeon.io.embedded import DATA_FILES, data_file

    sizes = {"sentiment_train.jsonl": 240, "sentiment_eval.jsonl": 80, "topic_train.jsonl": 160, "topic_eval.jsonl": 60,
             "question_train.jsonl": 120, "question_eval.jsonl": 40}
    for name in DATA_FILES:
        data = load_task_data(data_file(name), "classification")
        assert len(data) == sizes[name]
        assert len(set(data.texts)) == len(data)
        counts = {label: sum(e.label == label for e in data.examples) for label in data.labels}
        assert len(set(counts.values())) == 1, counts  # balanced
    train = set(load_task_data(data_file("sentiment_train.jsonl"), "classification").texts)
    assert not train & set(load_task_data(data_file("sentiment_eval.jsonl"), "classification").texts)
    questions = set(load_task_data(data_file("question_train.jsonl"), "classification").texts)
    assert not questions & set(load_task_data(data_file("question_eval.jsonl"), "classification").texts)
    assert load_task_data(data_file("question_eval.jsonl"), "classification").labels == (
        "person", "place", "quantity", "time")
    assert load_task_data(data_file("topic_eval.jsonl"), "classification").labels == ("cooking", "sports", "technology", "weather")


def test_minilm_path_finds_the_packaged_model():
    from surgeon.io.checkpoint import Checkpoint
    from surgeon.io.embedded import minilm_path

    folder = minilm_path()
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    with Checkpoint.open(folder) as ckpt:
        assert "encoder.layer.0.attention.self.query.weight" in ckpt.keys()
