"""`surgeon finetune` on tiny models: every method writes output that peft, transformers and surgeon load."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from safetensors.torch import load_file

from _finetune_helpers import build_model, lm_rows, sentiment_rows, topic_rows, write_jsonl
from _spectral_helpers import merged_state, reference_cosines
from surgeon.cli.main import cli
from surgeon.errors import SurgeonError
from surgeon.io.checkpoint import Checkpoint
from surgeon.provenance import PROVENANCE_FILE
from surgeon.workflows.train.evaluate import evaluate
from surgeon.workflows.train.finetune import FinetuneOptions, finetune

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
ADAPTERS = ["lora", "dora", "rslora", "pissa", "sparse-lora", "hira"]


@pytest.fixture(scope="session")
def ft(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft")
    paths = {kind: build_model(kind, root / kind) for kind in ("bert", "llama", "gpt2")}
    paths["train"] = write_jsonl(root / "train.jsonl", sentiment_rows(64, 0))
    paths["eval"] = write_jsonl(root / "eval.jsonl", sentiment_rows(32, 1))
    paths["topic"] = write_jsonl(root / "topic.jsonl", topic_rows(48, 2))
    paths["topic_eval"] = write_jsonl(root / "topic_eval.jsonl", topic_rows(24, 3))
    paths["lm"] = write_jsonl(root / "lm.jsonl", lm_rows(32, 0))
    paths["lm_eval"] = write_jsonl(root / "lm_eval.jsonl", lm_rows(8, 1))
    return paths


def run(ft: dict[str, Path], out: Path, **kw):
    opts = dict(base=str(ft["bert"]), data=str(ft["train"]), eval_data=str(ft["eval"]), out=str(out),
                epochs=1, batch_size=16, lr=1e-2)
    opts.update(kw)
    return finetune(FinetuneOptions(**opts))


def method_options(method: str) -> dict:
    return {"sparsity": 0.5} if method == "sparse-lora" else {}


@pytest.mark.parametrize("method", ADAPTERS + ["full"])
def test_method_output_reloads_to_the_trained_model(ft, tmp_path, method):
    """Evaluating the saved output reproduces the in-memory eval at the end of training exactly."""
    out = tmp_path / method
    report = run(ft, out, method=method, rank=4 if method != "full" else None, **method_options(method))
    assert report.eval is not None and report.stage == 1
    again = evaluate(out, data=ft["eval"], task="classification", device="cpu")
    assert again.metrics.accuracy == report.eval["accuracy"]
    assert again.metrics.loss == pytest.approx(report.eval["loss"], abs=1e-5)
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["command"] == "finetune" and record["parameters"]["method"] == method
    assert record["report"]["labels"] == ["negative", "positive"]
    with Checkpoint.open(out, prefix="model" if method == "full" else "adapter_model") as ckpt:
        assert ckpt.metadata["surgeon_command"] == "finetune"
    assert not [p for p in tmp_path.iterdir() if "surgeon-staging" in p.name]


def test_plain_peft_loads_and_merges_a_pissa_adapter_onto_the_original_base(ft, tmp_path):
    """PiSSA is saved converted: peft on the untouched base gives the trained logits, merged or not."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "pissa"
    report = run(ft, out, method="pissa", rank=4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"], config["peft_type"]) == (8, True, "LORA")
    base = AutoModelForSequenceClassification.from_pretrained(str(ft["bert"]), num_labels=2)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    batch = tok(["good movie", "awful day"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        merged = model.merge_and_unload()(**batch).logits
    torch.testing.assert_close(merged, logits, atol=1e-5, rtol=1e-5)
    assert report.eval["accuracy"] == evaluate(ft["bert"], adapter=out, data=ft["eval"], task="classification").metrics.accuracy


def test_full_output_is_a_complete_transformers_model(ft, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "full"
    run(ft, out, method="full", lr=1e-3)
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert {"config.json", "model.safetensors", "tokenizer.json", PROVENANCE_FILE} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("method,lr,epochs", [("lora", 1e-2, 4), ("full", 2e-3, 6)])
def test_loss_goes_down_on_a_learnable_task(ft, tmp_path, method, lr, epochs):
    report = run(ft, tmp_path / method, method=method, epochs=epochs, batch_size=8, lr=lr)
    assert report.train_loss[-1] < report.train_loss[0] - 0.1, report.train_loss
    assert report.eval["loss"] < report.eval_before["loss"]
    assert report.eval["accuracy"] >= 0.8 and report.eval_before["accuracy"] <= 0.6


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_causal_lm_lora_learns_the_pattern(ft, tmp_path, model):
    report = run(ft, tmp_path / model, base=str(ft[model]), task="causal-lm", data=str(ft["lm"]),
                 eval_data=str(ft["lm_eval"]), epochs=4, batch_size=8, rank=4)
    assert report.eval_per_epoch[-1]["loss"] < report.eval_before["loss"] - 0.3
    assert report.labels is None and report.target_modules > 0
    again = evaluate(tmp_path / model, data=ft["lm_eval"], task="causal-lm")
    assert again.metrics.loss == pytest.approx(report.eval["loss"], abs=1e-5)


def _factor_zeros(adapter: Path) -> tuple[dict[str, torch.Tensor], float]:
    """The LoRA factors in the written file (safetensors' own reader) and their fraction of exact zeros."""
    factors = {n: t for n, t in load_file(adapter / "adapter_model.safetensors").items()
               if ".lora_A." in n or ".lora_B." in n}
    assert factors
    return factors, sum(int((t == 0).sum()) for t in factors.values()) / sum(t.numel() for t in factors.values())


def test_sparse_lora_reaches_the_target_sparsity(ft, tmp_path):
    out = tmp_path / "sparse"
    report = run(ft, out, method="sparse-lora", rank=4, sparsity=0.7, epochs=2)
    factors, measured = _factor_zeros(out)
    for name, w in factors.items():
        assert (w == 0).sum().item() == round(0.7 * w.numel()), name
    assert measured == pytest.approx(0.7, abs=0.01) and report.sparsity == pytest.approx(measured, abs=1e-12)


def test_sparse_lora_l1_makes_exact_zeros(ft, tmp_path):
    out = tmp_path / "l1"
    report = run(ft, out, method="sparse-lora", rank=4, l1=5.0)
    _, measured = _factor_zeros(out)
    assert 0.2 < measured < 1.0 and report.sparsity == pytest.approx(measured, abs=1e-12)


def test_same_seed_same_adapter_bytes(ft, tmp_path):
    a = run(ft, tmp_path / "a", rank=4, seed=3)
    b = run(ft, tmp_path / "b", rank=4, seed=3)
    c = run(ft, tmp_path / "c", rank=4, seed=4)
    assert a.train_loss == b.train_loss != c.train_loss
    with Checkpoint.open(tmp_path / "a") as x, Checkpoint.open(tmp_path / "b") as y, Checkpoint.open(tmp_path / "c") as z:
        assert all(x.read_raw(n) == y.read_raw(n) for n in x.keys())
        assert any(x.read_raw(n) != z.read_raw(n) for n in x.keys())


def test_report_counts_trainable_parameters(ft, tmp_path):
    report = run(ft, tmp_path / "qv", rank=2, targets="qv")
    # 2 layers x (query, value) x rank 2 x (32 in + 32 out) + classifier 32*2+2
    assert report.trainable_parameters == 2 * 2 * 2 * (32 + 32) + 66
    assert report.target_modules == 4
    assert report.trainable_percent == pytest.approx(100 * report.trainable_parameters / report.total_parameters)
    assert report.peak_memory_bytes > 0 and report.wall_time_s > 0


def test_continual_learning_keeps_training_the_previous_adapter(ft, tmp_path):
    stage1 = tmp_path / "s1"
    run(ft, stage1, rank=4, epochs=2)
    stage2 = tmp_path / "s2"
    report = run(ft, stage2, data=str(ft["topic"]), eval_data=str(ft["topic_eval"]), continue_from=str(stage1), lr=1e-12)
    assert report.stage == 2 and report.labels == ["food", "sport", "tech"]
    assert any("head was initialized fresh" in note for note in report.notes)
    with Checkpoint.open(stage1) as a, Checkpoint.open(stage2) as b:
        factors = [n for n in a.keys() if ".lora_" in n]
        assert factors and sorted(factors) == sorted(n for n in b.keys() if ".lora_" in n)
        for n in factors:
            torch.testing.assert_close(a.get(n), b.get(n), atol=1e-8, rtol=0)
        assert b.info("base_model.model.classifier.weight").shape == (3, 32)
    stage3 = tmp_path / "s3"
    report3 = run(ft, stage3, data=str(ft["train"]), continue_from=str(stage2), epochs=1)
    assert report3.stage == 3


def test_continual_full_fine_tuning(ft, tmp_path):
    run(ft, tmp_path / "f1", method="full", lr=1e-3)
    report = run(ft, tmp_path / "f2", method="full", data=str(ft["topic"]), eval_data=str(ft["topic_eval"]),
                 continue_from=str(tmp_path / "f1"), lr=1e-3)
    assert report.stage == 2
    assert evaluate(tmp_path / "f2", data=ft["topic_eval"], task="classification").labels == ["food", "sport", "tech"]


@pytest.mark.skipif(HAS_BNB, reason="bitsandbytes is installed")
def test_qlora_without_bitsandbytes_names_what_to_install(ft, tmp_path):
    result = CliRunner().invoke(cli, ["finetune", str(ft["bert"]), "--data", str(ft["train"]), "--method", "qlora",
                                      "-o", str(tmp_path / "q")])
    assert result.exit_code == 1
    assert result.output == ("Error: --method qlora needs bitsandbytes for the 4-bit NF4 base, and it is not installed; "
                             "run pip install bitsandbytes (CPU wheels exist for Linux x86-64) or use --method lora.\n")


@pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes")
def test_qlora_trains_on_a_4bit_base(ft, tmp_path):
    out = tmp_path / "qlora"
    report = run(ft, out, base=str(ft["llama"]), task="causal-lm", data=str(ft["lm"]), eval_data=str(ft["lm_eval"]),
                 method="qlora", rank=4, epochs=3, batch_size=8)
    assert report.eval["loss"] < report.eval_before["loss"]
    assert any("NF4" in note for note in report.notes)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert evaluate(out, data=ft["lm_eval"], task="causal-lm").metrics.loss < report.eval_before["loss"]


@pytest.mark.parametrize("args,message", [
    (["--method", "hira", "--alpha", "4"], "--alpha does not apply to --method hira (HiRA has no scaling factor)."),
    (["--method", "sparse-lora"], "--method sparse-lora needs --l1 LAMBDA and/or --sparsity FRACTION (e.g. --sparsity 0.5)."),
    (["--sparsity", "0.5"], "--l1 and --sparsity apply to --method sparse-lora only."),
    (["--method", "full", "--rank", "4"], "--rank, --alpha and --targets are for adapter methods; --method full trains every weight."),
    (["--method", "sparse-lora", "--sparsity", "1.5"], "--sparsity is the fraction of zeros in A and B, in [0, 1) (got 1.5)."),
    (["--epochs", "0"], "--epochs must be a positive integer (got 0)."),
])
def test_bad_options(ft, tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["finetune", str(ft["bert"]), "--data", str(ft["train"]), "-o", str(out), *args])
    assert (result.exit_code, result.output) == (1, f"Error: {message}\n")
    assert not out.exists()


def test_errors_name_the_problem(ft, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = runner.invoke(cli, ["finetune", str(ft["bert"]), "--data", str(ft["train"]), "-o", str(out)])
    assert result.output == f"Error: {out}: output folder is not empty; choose another or pass --overwrite to replace it.\n"
    result = runner.invoke(cli, ["finetune", str(ft["bert"]), "--data", str(ft["lm"]), "--task", "causal-lm", "-o", str(tmp_path / "x")])
    assert result.output == f"Error: {ft['bert']}: is an encoder (bert); --task causal-lm needs a decoder model (GPT-2, Llama, ...).\n"
    result = runner.invoke(cli, ["finetune", str(ft["bert"]), "--data", str(ft["train"]), "--targets", "nope", "-o", str(tmp_path / "y")])
    assert result.output == (f"Error: {ft['bert']}: --targets 'nope' matches no module (linear layers in blocks: dense, key, query, value); "
                             "use those names or a preset (all-linear, attention, mlp, qv).\n")
    bad_eval = write_jsonl(tmp_path / "bad_eval.jsonl", [{"text": "meh", "label": "neutral"}])
    result = runner.invoke(cli, ["finetune", str(ft["bert"]), "--data", str(ft["train"]), "--eval", str(bad_eval), "-o", str(tmp_path / "z")])
    assert result.output == (f"Error: {bad_eval}: line 1: label 'neutral' is not among the training labels (negative, positive); "
                             "fix the label or add examples of it to the training data.\n")
    assert result.exit_code == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_prints_the_report_and_json(ft, tmp_path):
    result = CliRunner().invoke(cli, ["finetune", str(ft["bert"]), "--data", str(ft["train"]), "--eval", str(ft["eval"]),
                                      "--rank", "2", "--epochs", "1", "--json", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["command"] == "finetune" and body["method"] == "lora" and body["rank"] == 2 and body["alpha"] == 4.0
    assert len(body["train_loss"]) == 1 and body["eval"]["examples"] == 32
    result = CliRunner().invoke(cli, ["finetune", str(ft["bert"]), "--data", str(ft["train"]), "--method", "full",
                                      "--epochs", "1", "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "full (all weights) on 64 examples, stage 1" in result.output and "trainable:" in result.output


@pytest.mark.parametrize("method", ["lora", "dora", "rslora", "pissa", "sparse-lora", "hira", "causal-lora"])
def test_surgeon_merge_and_intruders_accept_the_adapter(ft, tmp_path, method):
    """Merged by surgeon onto a base that has the head: peft's merge_and_unload of the saved adapter, the
    accuracy it was trained to, and intruder cosines equal to full float64 SVDs of base and merged."""
    out = tmp_path / method
    if method == "causal-lora":
        base = build_model("llama", tmp_path / "llama-base")
        run(ft, out, base=str(base), task="causal-lm", data=str(ft["lm"]), eval_data=None, rank=4)
    else:
        base = build_model("bert-cls", tmp_path / "cls-base")
        report = run(ft, out, base=str(base), method=method, rank=4, **method_options(method))
    merged = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(base), str(out), "-o", str(merged)])
    assert result.exit_code == 0, result.output
    reference = merged_state(base, out, kind="causal" if method == "causal-lora" else "seqcls")
    ours, base_weights = load_file(merged / "model.safetensors"), load_file(base / "model.safetensors")
    assert ours.keys() == base_weights.keys()
    changed = {n for n in ours if not torch.equal(ours[n], base_weights[n])}
    assert changed and changed == {n for n in reference if not torch.equal(reference[n], base_weights[n])}
    for name in ours:  # float32 base: the same operations as peft, so the same bits
        assert torch.equal(ours[name], reference[name]), name
    if method != "causal-lora":
        again = evaluate(merged, data=ft["eval"], task="classification")
        assert again.metrics.loss == pytest.approx(report.eval["loss"], abs=1e-4)
    result = CliRunner().invoke(cli, ["intruders", str(merged), "--base", str(base), "--json", "--no-cache"])
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(result.stdout)["matrices"] if r["status"] == "analysed"]
    assert rows and {r["name"] for r in rows} <= changed
    for row in rows:
        cosines, sigma = reference_cosines(base_weights[row["name"]], ours[row["name"]], 10)
        assert row["cos_left"] == pytest.approx(cosines, abs=1e-5), row["name"]
        assert row["sigma"] == pytest.approx(sigma[:10].tolist(), rel=1e-5), row["name"]
        assert row["intruders"] == [j + 1 for j, c in enumerate(cosines) if c < 0.5], row["name"]


def test_finetune_requires_tokenizer(ft, tmp_path, tiny_bert):
    with pytest.raises(SurgeonError) as err:
        run(ft, tmp_path / "o", base=str(tiny_bert))
    assert "no tokenizer files" in str(err.value) or "tokenizer files do not load" in str(err.value)
