"""`surgeon eval --head-from PATH`: a classification head from another checkpoint, for an adapter (or a
model) that has none. The reference is peft's own loading of the adapter with its head, and a
transformers classifier whose head is set by hand."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from _finetune_helpers import build_model, sentiment_rows, write_jsonl
from _hostile_helpers import digest, one_line
from surgeon.cli.main import cli
from surgeon.workflows.train.finetune import FinetuneOptions, finetune

LABELS = ["negative", "positive"]


def strip_head(src: Path, dst: Path) -> Path:
    """``src`` (a peft SEQ_CLS adapter with its head in modules_to_save) without the head."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "classifier" not in k}, str(dst / "adapter_model.safetensors"))
    config = json.loads((dst / "adapter_config.json").read_text())
    config["modules_to_save"] = None
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("headfrom")
    p = {"bert": build_model("bert", root / "bert"), "train": write_jsonl(root / "train.jsonl", sentiment_rows(32, 0)),
         "eval": write_jsonl(root / "eval.jsonl", sentiment_rows(16, 1))}
    common = dict(base=str(p["bert"]), data=str(p["train"]), epochs=2, batch_size=8, lr=3e-2)
    p["lora"], p["full"] = root / "lora", root / "full"
    finetune(FinetuneOptions(out=str(p["lora"]), method="lora", rank=4, **common))
    finetune(FinetuneOptions(out=str(p["full"]), method="full", **{**common, "lr": 3e-3}))
    p["headless"] = strip_head(p["lora"], root / "headless")
    head = {k.removeprefix("base_model.model."): v for k, v in load_file(str(p["lora"] / "adapter_model.safetensors")).items()
            if "classifier" in k}
    p["head_file"] = root / "head.safetensors"
    save_file(head, str(p["head_file"]))
    p["head_dir"] = root / "head-dir"
    p["head_dir"].mkdir()
    save_file(head, str(p["head_dir"] / "classifier.safetensors"))
    return p


def reference_loss(base: Path, data: Path, *, adapter: Path | None = None, head: dict[str, torch.Tensor] | None = None):
    """Mean cross-entropy of a transformers classifier on ``base`` (+ peft's loading of ``adapter``, or a
    head copied in by hand)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2)
    if head is not None:
        with torch.no_grad():
            model.classifier.weight.copy_(head["classifier.weight"])
            model.classifier.bias.copy_(head["classifier.bias"])
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    batch = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    target = torch.tensor([LABELS.index(r["label"]) for r in rows])
    with torch.no_grad():
        logits = model(**batch).logits
    return float(torch.nn.functional.cross_entropy(logits, target)), float((logits.argmax(-1) == target).float().mean())


def run(*args: object) -> object:
    return CliRunner().invoke(cli, ["eval", *(str(a) for a in args)])


def eval_json(*args: object) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("source", ["lora", "head_file", "head_dir"])
def test_headless_adapter_with_the_head_from_elsewhere_equals_peft_with_its_head(hf, source):
    loss, accuracy = reference_loss(hf["bert"], hf["eval"], adapter=hf["lora"])
    before = digest(hf["bert"], hf["headless"], hf[source])
    body = eval_json(hf["bert"], "--adapter", hf["headless"], "--data", hf["eval"], "--task", "classification",
                     "--head-from", hf[source])
    assert body["metrics"]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert body["metrics"]["accuracy"] == pytest.approx(accuracy)
    assert body["head"] == {"source": str(hf[source]), "via": "head-from",
                            "tensors": ["classifier.bias", "classifier.weight"], "labels": LABELS}
    assert digest(hf["bert"], hf["headless"], hf[source]) == before


def test_bare_base_with_the_head_of_a_full_fine_tune(hf):
    head = load_file(str(hf["full"] / "model.safetensors"))
    loss, _ = reference_loss(hf["bert"], hf["eval"], head={k: head[k] for k in ("classifier.weight", "classifier.bias")})
    body = eval_json(hf["bert"], "--data", hf["eval"], "--task", "classification", "--head-from", hf["full"])
    assert body["metrics"]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert body["head"]["via"] == "head-from" and body["labels"] == LABELS  # names from the fine-tune's config


def test_text_output_names_the_head(hf):
    result = run(hf["bert"], "--adapter", hf["headless"], "--data", hf["eval"], "--task", "classification",
                 "--head-from", hf["head_file"])
    assert result.exit_code == 0, result.output
    assert (f"  head:        classifier.bias, classifier.weight from --head-from {hf['head_file']} "
            "(2 labels: negative, positive)") in result.output
    result = run(hf["lora"], "--data", hf["eval"], "--task", "classification")
    assert f"from the adapter {hf['lora']} (2 labels" in result.output
    result = run(hf["full"], "--data", hf["eval"], "--task", "classification", "--json")
    assert json.loads(result.stdout)["head"]["via"] == "model"


def test_headless_adapter_without_head_from_says_how(hf):
    one_line(run(hf["bert"], "--adapter", hf["headless"], "--data", hf["eval"], "--task", "classification"), 1,
             f"{hf['headless']}: holds no classification head", "--head-from PATH")


def test_headless_adapter_drift_needs_no_head(hf):
    body = eval_json(hf["bert"], "--adapter", hf["headless"], "--data", hf["eval"], "--drift-from", hf["bert"])
    reference = eval_json(hf["bert"], "--adapter", hf["lora"], "--data", hf["eval"], "--drift-from", hf["bert"])
    assert body["drift"]["mean_cosine"] == pytest.approx(reference["drift"]["mean_cosine"], abs=1e-7)


def _bad_head(root: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = root / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path


def test_head_from_errors_are_one_line(hf, tmp_path):
    w = torch.randn(2, 32)
    wide = _bad_head(tmp_path, "wide", {"classifier.weight": torch.randn(2, 64), "classifier.bias": torch.zeros(2)})
    three = _bad_head(tmp_path, "three", {"classifier.weight": torch.randn(3, 32), "classifier.bias": torch.zeros(3)})
    nan = w.clone()
    nan[1, 3] = float("nan")
    broken = _bad_head(tmp_path, "nan", {"classifier.weight": nan, "classifier.bias": torch.zeros(2)})
    nobias = _bad_head(tmp_path, "nobias", {"classifier.weight": w})
    fifo = tmp_path / "head.fifo"
    os.mkfifo(fifo)
    before = digest(hf["bert"], hf["headless"], hf["lora"], hf["full"], tmp_path)
    common = (hf["bert"], "--adapter", hf["headless"], "--data", hf["eval"], "--task", "classification", "--head-from")
    one_line(run(*common, hf["bert"]), 1, f"{hf['bert']}: holds no classification head", "classifier.*")
    one_line(run(*common, wide), 1, f"{wide}: head tensor 'classifier.weight' is 2x64", "needs 2x32", "same hidden size")
    one_line(run(*common, three), 1, f"{three}: its head has 3 outputs", f"{hf['headless']} was trained with 2 labels",
             "negative, positive")
    one_line(run(*common, broken), 1, f"{broken}: head tensor 'classifier.weight' holds NaN/Inf")
    one_line(run(*common, nobias), 1, f"{nobias}: its head lacks classifier.bias")
    one_line(run(*common, fifo), 1, f"{fifo}: is not a regular file or folder")
    one_line(run(*common, tmp_path / "missing"), 1, "missing: no such file or folder")
    one_line(run(hf["bert"], "--adapter", hf["lora"], "--data", hf["eval"], "--task", "classification",
                 "--head-from", hf["head_file"]), 1, f"{hf['lora']}: holds its own trained head", "drop --head-from")
    one_line(run(hf["full"], "--data", hf["eval"], "--task", "classification", "--head-from", hf["head_file"]), 1,
             f"{hf['full']}: already has a trained classification head", "drop --head-from")
    one_line(run(hf["bert"], "--data", hf["eval"], "--drift-from", hf["bert"], "--head-from", hf["head_file"]), 1,
             "--head-from gives a classification head; use it with --task classification.")
    assert digest(hf["bert"], hf["headless"], hf["lora"], hf["full"], tmp_path) == before


def test_bare_base_without_head_names_head_from(hf):
    one_line(run(hf["bert"], "--data", hf["eval"], "--task", "classification"), 1,
             "config.json has no id2label, so it is not a trained classifier; give its head with --head-from PATH")


def _with_nan(src: Path, dst: Path, file: str, pick: str) -> tuple[Path, str]:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / file))
    name = next(k for k in sorted(tensors) if pick in k)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(dst / file), metadata={"format": "pt"})
    return dst, name


def test_nan_weights_are_refused_not_measured(hf, tmp_path):
    # transformers' attention turns a NaN query weight into finite logits: the metrics would look fine
    model, _ = _with_nan(hf["full"], tmp_path / "full-nan", "model.safetensors", "attention.self.query.weight")
    one_line(run(model, "--data", hf["eval"], "--task", "classification"), 1,
             f"{model}: weight 'bert.encoder.layer.0.attention.self.query.weight' holds 1 NaN/Inf value(s)",
             "re-download or re-train it")
    one_line(run(hf["full"], "--data", hf["eval"], "--drift-from", model), 1, f"{model}: weight ")
    adapter, _ = _with_nan(hf["headless"], tmp_path / "lora-nan", "adapter_model.safetensors", "lora_B")
    one_line(run(hf["bert"], "--adapter", adapter, "--data", hf["eval"], "--task", "classification",
                 "--head-from", hf["head_file"]), 1, f"{adapter}: weight ", "lora_B")
