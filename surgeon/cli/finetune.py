"""`surgeon finetune BASE --data TRAIN --method M -o OUT`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from surgeon.cli.common import emit_json, global_options, human_bytes, human_count, info, json_option, overwrite_option, table
from surgeon.cli.lazy import gc_paused
from surgeon.workflows.train.options import METHODS

if TYPE_CHECKING:
    from surgeon.workflows.train.finetune import FinetuneReport


@click.command("finetune")
@click.argument("base")
@click.option("--data", required=True, help="Training data: .jsonl or .csv with text (+ label), or prompt/completion.")
@click.option("--eval", "eval_data", help="Evaluation data, same format; measured before training and after every epoch.")
@click.option("--task", type=click.Choice(["classification", "causal-lm"]), default="classification", show_default=True)
@click.option("--method", type=click.Choice(METHODS), default="lora", show_default=True)
@click.option("--rank", "-r", type=int, help="Adapter rank r.  [default: 8]")
@click.option("--alpha", type=float, help="LoRA alpha (scale alpha/r; rsLoRA alpha/sqrt(r)).  [default: 2 x rank]")
@click.option("--targets", help="Modules to adapt: all-linear, attention, mlp, qv, or names like query,value.  [default: all-linear]")
@click.option("--lr", type=float, help="Peak learning rate (AdamW, 10% warmup, linear decay).  [default: 5e-5 full, 1e-2 hira, 1e-3 other adapters]")
@click.option("--head-lr", "head_lr", type=float,
              help="Peak learning rate of the classification head (a fresh head often wants more than --lr).  [default: --lr]")
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per example (longer ones are cut).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same data order and init: same output.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--l1", type=float, help="sparse-lora: L1 strength on A and B (proximal step: small entries become 0).")
@click.option("--sparsity", type=float, help="sparse-lora: fraction of zeros to prune A and B to by the last epoch.")
@click.option("--continue-from", "continue_from", help="A previous finetune output to keep training on this task (continual learning).")
@click.option("-o", "--output", "out", required=True, help="Output folder (adapter or complete model).")
@overwrite_option
@json_option
@global_options
def command(base: str, out: str, as_json: bool, **kwargs: object) -> None:
    """Fine-tune BASE to produce inputs for surgery: full, LoRA family, sparse LoRA, HiRA, QLoRA.

    Adapter methods write a standard PEFT adapter folder (the classification
    head as modules_to_save); --method full writes a complete model folder.
    Both hold the tokenizer and surgeon_provenance.json with this report.

    \b
    Example:
      surgeon finetune ./all-MiniLM-L6-v2 --data train.jsonl --eval eval.jsonl \\
          --method lora --rank 16 --epochs 3 -o ./minilm-lora-r16
      surgeon finetune ./all-MiniLM-L6-v2 --data topics.jsonl --method lora \\
          --continue-from ./minilm-lora-r16 -o ./minilm-lora-r16-stage2
    """
    with gc_paused():
        from surgeon.workflows.train.finetune import FinetuneOptions, finetune

    report = finetune(FinetuneOptions(base=base, out=out, **kwargs))  # type: ignore[arg-type]
    if as_json:
        emit_json("finetune", report.to_dict())
        return
    render(report)


def render(r: FinetuneReport) -> None:
    shape = f"r={r.rank} alpha={r.alpha:g}" if r.rank and r.alpha is not None else (f"r={r.rank}" if r.rank else "all weights")
    click.echo(f"{r.output}: {r.method} ({shape}) on {r.train_examples} examples, stage {r.stage}")
    click.echo(f"  trainable:   {r.trainable_parameters:,} of {r.total_parameters:,} ({r.trainable_percent:.2f}%, "
               f"{human_count(r.trainable_parameters)})")
    if r.target_modules:
        click.echo(f"  targets:     {r.target_modules} modules ({r.targets})")
    if r.sparsity is not None:
        click.echo(f"  sparsity:    {100 * r.sparsity:.1f}% of A and B entries are zero")
    click.echo(f"  time:        {r.wall_time_s:.1f} s on {r.device}; peak memory {human_bytes(r.peak_memory_bytes)} ({r.memory_kind})")
    for note in r.notes:
        info(f"  note: {note}")
    rows = []
    for i, loss in enumerate(r.train_loss):
        ev = r.eval_per_epoch[i] if i < len(r.eval_per_epoch) else None
        rows.append((i + 1, f"{loss:.4f}", _metric(ev)))
    before = [("before", "", _metric(r.eval_before))] if r.eval_before else []
    click.echo("")
    table(["epoch", "train loss", "eval"], before + rows)


def _metric(m: dict | None) -> str:
    if not m:
        return ""
    if m.get("accuracy") is not None:
        return f"acc {100 * m['accuracy']:.1f}%  loss {m['loss']:.4f}"
    return f"loss {m['loss']:.4f}  ppl {m['perplexity']:.2f}"
