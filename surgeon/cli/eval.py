"""`surgeon eval MODEL --data FILE --task T`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from surgeon.cli.common import emit_json, global_options, json_option
from surgeon.cli.lazy import gc_paused

if TYPE_CHECKING:
    from surgeon.workflows.train.evaluate import EvalManyReport, EvalReport


@click.command("eval")
@click.argument("model")
@click.option("--adapter", help="A PEFT adapter to apply to MODEL (MODEL may also be the adapter folder itself).")
@click.option("--data", "data", required=True, multiple=True,
              help=".jsonl or .csv: text + label (classification), text or prompt/completion; repeat it for "
                   "several tasks (each is reported).")
@click.option("--task", type=click.Choice(["classification", "causal-lm"]),
              help="classification: accuracy with the trained head; causal-lm: token loss and perplexity "
                   "(masked-LM loss for encoders with an MLM head).")
@click.option("--drift-from", "drift_from", help="Base model: mean cosine of MODEL's sentence embeddings to the base's.")
@click.option("--tokenizer", metavar="PATH", default=None,
              help="Folder whose tokenizer to use. [default: MODEL's (or the adapter's), else --drift-from's]")
@click.option("--head-from", "head_from", metavar="PATH", default=None,
              help="Classification head for a model or adapter that has none (trained on a bare base): the "
                   "fine-tuned model or adapter folder, or a folder/.safetensors file with its classifier.* or "
                   "score.* tensors.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the masked-LM token choice.")
@json_option
@global_options
def command(model: str, data: tuple[str, ...], as_json: bool, **kwargs: object) -> None:
    """Measure task skill (accuracy, loss, perplexity) and forgetting (embedding drift).

    \b
    Example:
      surgeon eval ./minilm-full --data eval.jsonl --task classification
      surgeon eval ./all-MiniLM-L6-v2 --adapter ./minilm-lora-r16 --data eval.jsonl --task classification
      surgeon eval ./minilm-full --data texts.jsonl --drift-from ./all-MiniLM-L6-v2 --json
      surgeon eval ./merged-no-tokenizer --data eval.jsonl --task classification --tokenizer ./all-MiniLM-L6-v2
      surgeon eval ./all-MiniLM-L6-v2 --adapter ./lora-no-head --data eval.jsonl --task classification --head-from ./minilm-full
      surgeon eval ./minilm-lora --data sentiment_eval.jsonl --data topic_eval.jsonl --drift-from ./all-MiniLM-L6-v2
    """
    with gc_paused():
        from surgeon.workflows.train.evaluate import evaluate, evaluate_many

    if len(data) > 1:
        many = evaluate_many(model, data=list(data), **kwargs)  # type: ignore[arg-type]
        if as_json:
            emit_json("eval", many.to_dict())
            return
        render_many(many)
        return
    report = evaluate(model, data=data[0], **kwargs)  # type: ignore[arg-type]
    if as_json:
        emit_json("eval", report.to_dict())
        return
    render(report)


def render_many(many: EvalManyReport) -> None:
    """Each data file's report, then one line per file."""
    for r in many.reports:
        render(r)
    if all(r.metrics is not None and r.metrics.accuracy is not None for r in many.reports):
        click.echo("accuracy: " + ", ".join(f"{r.data} {100 * r.metrics.accuracy:.2f}%"  # type: ignore[union-attr]
                                            for r in many.reports))


def render(r: EvalReport) -> None:
    target = r.model + (f" + {r.adapter}" if r.adapter else "")
    click.echo(f"{target} on {r.data} ({r.device}, {r.wall_time_s:.1f} s)")
    if r.tokenizer is not None and r.tokenizer not in (r.model, r.adapter):
        click.echo(f"  tokenizer:   from {r.tokenizer}")
    if r.head is not None:
        via = {"head-from": "--head-from ", "adapter": "the adapter ", "model": ""}[r.head.via]
        click.echo(f"  head:        {', '.join(r.head.tensors)} from {via}{r.head.source} "
                   f"({len(r.head.labels)} labels: {', '.join(r.head.labels)})")
    m = r.metrics
    if m is not None and m.kind == "classification":
        click.echo(f"  accuracy:    {100 * (m.accuracy or 0):.2f}% of {m.examples} examples")
        click.echo(f"  loss:        {m.loss:.4f} (mean cross-entropy)")
    elif m is not None:
        name = "masked-LM loss" if m.kind == "masked-lm" else "token loss"
        click.echo(f"  {name}:  {m.loss:.4f} over {m.tokens} tokens ({m.examples} examples)")
        click.echo(f"  perplexity:  {m.perplexity:.3f}" + (" (pseudo-perplexity of masked tokens)" if m.kind == "masked-lm" else ""))
    if r.drift is not None:
        d = r.drift
        click.echo(f"  drift from {d.base}: mean cosine {d.mean_cosine:.4f} (min {d.min_cosine:.4f}) over {d.texts} texts")
