"""`surgeon eval`: accuracy, token loss, masked-LM loss and embedding drift against transformers references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from _finetune_helpers import build_model, lm_rows, sentiment_rows, write_jsonl
from surgeon.cli.main import cli
from surgeon.workflows.train.evaluate import evaluate, mask_tokens
from surgeon.workflows.train.finetune import FinetuneOptions, finetune


@pytest.fixture(scope="session")
def ev(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ev")
    paths = {kind: build_model(kind, root / kind) for kind in ("bert", "bert-mlm", "llama")}
    paths["train"] = write_jsonl(root / "train.jsonl", sentiment_rows(32, 0))
    paths["eval"] = write_jsonl(root / "eval.jsonl", sentiment_rows(16, 1))
    paths["lm"] = write_jsonl(root / "lm.jsonl", lm_rows(16, 0))
    paths["qa"] = write_jsonl(root / "qa.jsonl", [{"prompt": "the cat", "completion": " and the dog"},
                                                  {"prompt": "so", "completion": " good"}])
    common = dict(base=str(paths["bert"]), data=str(paths["train"]), epochs=2, batch_size=8, lr=1e-2)
    paths["full"] = root / "full"
    finetune(FinetuneOptions(out=str(paths["full"]), method="full", **{**common, "lr": 1e-3}))
    paths["lora"] = root / "lora"
    finetune(FinetuneOptions(out=str(paths["lora"]), method="lora", rank=4, **common))
    return paths


def reference_accuracy(model_dir: Path, data: Path, adapter: Path | None = None) -> float:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(adapter or model_dir))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    batch = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1)
    target = torch.tensor([["negative", "positive"].index(r["label"]) for r in rows])
    return float((pred == target).float().mean())


def test_classification_accuracy_matches_transformers(ev):
    full = evaluate(ev["full"], data=ev["eval"], task="classification")
    assert full.metrics.accuracy == pytest.approx(reference_accuracy(ev["full"], ev["eval"]))
    lora = evaluate(ev["bert"], adapter=ev["lora"], data=ev["eval"], task="classification")
    assert lora.metrics.accuracy == pytest.approx(reference_accuracy(ev["bert"], ev["eval"], ev["lora"]))
    assert lora.labels == ["negative", "positive"] and lora.metrics.examples == 16


def test_causal_loss_counts_only_completion_tokens(ev):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = evaluate(ev["llama"], data=ev["qa"], task="causal-lm", batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(str(ev["llama"])).eval()
    tok = AutoTokenizer.from_pretrained(str(ev["llama"]))
    total, count = 0.0, 0
    for prompt, completion in [("the cat", " and the dog"), ("so", " good")]:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        labels = torch.tensor([[-100] * len(p) + c])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        total += float(loss) * (len(c) - (1 if not p else 0))
        count += len(c)
    assert report.metrics.tokens == count
    assert report.metrics.loss == pytest.approx(total / count, rel=1e-5)
    assert report.metrics.perplexity == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def _documented_masks(texts: list[list[int]], special: set[int], mask_id: int, seed: int):
    """The rule README/DESIGN promise, written here: one generator seeded with ``seed`` walks the texts in
    order; in each, round(15%) (at least one) of the non-special positions, drawn as the first entries of a
    random permutation of them, become [MASK] and are the only labelled positions."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for ids in texts:
        free = [i for i, t in enumerate(ids) if t not in special]
        picked = {free[k] for k in torch.randperm(len(free), generator=gen)[: max(1, round(0.15 * len(free)))]}
        out.append(([mask_id if i in picked else t for i, t in enumerate(ids)],
                    [t if i in picked else -100 for i, t in enumerate(ids)]))
    return out


def test_mask_tokens_masks_fifteen_percent_of_the_non_special_positions():
    """Hand-set: [CLS]=101 / [SEP]=102 never masked; 40 free positions -> 6 masked, 3 -> 1, none -> 0."""
    special, mask_id = {101, 102}, 103
    ids = [101] + list(range(1, 41)) + [102]
    masked, labels = mask_tokens(ids, special, mask_id, torch.Generator().manual_seed(0))
    picked = [i for i, x in enumerate(masked) if x == mask_id]
    assert len(picked) == 6 and all(0 < i < 41 for i in picked)
    assert [i for i, x in enumerate(labels) if x != -100] == picked
    assert all(labels[i] == ids[i] == i for i in picked)
    assert all(masked[i] == ids[i] for i in range(len(ids)) if i not in picked)
    again, _ = mask_tokens(ids, special, mask_id, torch.Generator().manual_seed(0))
    assert again == masked  # seeded
    short, short_labels = mask_tokens([101, 7, 8, 9, 102], special, mask_id, torch.Generator().manual_seed(3))
    assert short.count(mask_id) == 1 and short[0] == 101 and short[-1] == 102
    assert sum(x != -100 for x in short_labels) == 1
    assert mask_tokens([101, 102], special, mask_id, torch.Generator()) == ([101, 102], [-100, -100])


def test_masked_lm_loss_for_encoders_with_an_mlm_head(ev):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    report = evaluate(ev["bert-mlm"], data=ev["lm"], task="causal-lm", seed=5)
    assert report.metrics.kind == "masked-lm"
    model = AutoModelForMaskedLM.from_pretrained(str(ev["bert-mlm"])).eval()
    tok = AutoTokenizer.from_pretrained(str(ev["bert-mlm"]))
    texts = [tok(json.loads(line)["text"])["input_ids"] for line in ev["lm"].read_text().splitlines()]
    total, count = 0.0, 0
    for masked, labels in _documented_masks(texts, set(tok.all_special_ids), tok.mask_token_id, seed=5):
        n = sum(1 for x in labels if x != -100)
        with torch.no_grad():
            total += float(model(input_ids=torch.tensor([masked]), labels=torch.tensor([labels])).loss) * n
        count += n
    assert report.metrics.tokens == count
    assert report.metrics.loss == pytest.approx(total / count, rel=1e-5)
    assert evaluate(ev["bert-mlm"], data=ev["lm"], task="causal-lm", seed=5).metrics.loss == report.metrics.loss
    assert evaluate(ev["bert-mlm"], data=ev["lm"], task="causal-lm", seed=6).metrics.loss != report.metrics.loss


def test_drift_is_one_for_the_base_and_less_after_fine_tuning(ev):
    same = evaluate(ev["bert"], data=ev["eval"], drift_from=ev["bert"])
    assert same.drift.mean_cosine == pytest.approx(1.0, abs=1e-6) and same.metrics is None
    full = evaluate(ev["full"], data=ev["eval"], drift_from=ev["bert"])
    lora = evaluate(ev["lora"], data=ev["eval"], drift_from=ev["bert"])
    for report in (full, lora):
        assert report.drift.texts == 16
        assert report.drift.min_cosine <= report.drift.mean_cosine < 1 - 1e-5


def test_eval_cli_text_and_json(ev):
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", str(ev["lora"]), "--data", str(ev["eval"]), "--task", "classification",
                                 "--drift-from", str(ev["bert"])])
    assert result.exit_code == 0, result.output
    assert "accuracy:" in result.output and "drift from" in result.output
    result = runner.invoke(cli, ["eval", str(ev["llama"]), "--data", str(ev["lm"]), "--task", "causal-lm", "--json"])
    body = json.loads(result.stdout)
    assert body["command"] == "eval" and body["metrics"]["kind"] == "causal-lm" and body["metrics"]["perplexity"] > 1


@pytest.mark.parametrize("args,message", [
    (["{bert}", "--task", "classification", "--data", "{eval}"],
     "{bert}: config.json has no id2label, so it is not a trained classifier; "
     "give its head with --head-from PATH (the fine-tuned model or adapter)."),
    (["{bert}", "--task", "causal-lm", "--data", "{lm}"],
     "{bert}: has no trained masked-LM head (cls.predictions would be random); "
     "for an encoder without an LM head measure forgetting with --drift-from BASE."),
    (["{bert}", "--data", "{lm}"], "nothing to measure; give --task classification|causal-lm, --drift-from BASE, or both."),
    (["{llama}", "--adapter", "{lora}", "--task", "classification", "--data", "{eval}"], None),
    (["{lora}", "--task", "classification", "--data", "{lm}"],
     "{lm}: line 1 has no 'label' column (found: text); classification data needs 'text' and 'label' columns."),
])
def test_eval_errors(ev, args, message):
    result = CliRunner().invoke(cli, ["eval", *[a.format(**{k: str(v) for k, v in ev.items()}) for a in args]])
    assert result.exit_code == 1, result.output
    if message is None:  # an adapter on the wrong base: one line naming the adapter
        assert result.output.startswith(f"Error: {ev['lora']}: ") and result.output.count("\n") == 1
    else:
        assert result.output == "Error: " + message.format(**{k: str(v) for k, v in ev.items()}) + "\n"
