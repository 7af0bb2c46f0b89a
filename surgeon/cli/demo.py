"""`surgeon demo [-o DIR]`."""

from __future__ import annotations

import click

from surgeon.cli.common import emit_json, global_options, info, json_option, overwrite_option, table
from surgeon.cli.lazy import gc_paused


def _announce(i: int, n: int, title: str, seconds: float | None) -> None:
    if seconds is None:
        info(f"[{i}/{n}] {title} ...")
    else:
        info(f"[{i}/{n}] {title}: {seconds:.1f} s")


@click.command("demo")
@click.option("-o", "--output", "out", default=None,
              help="Folder for the report, JSON, plots and models [default: surgeon-demo, or surgeon-demo-continual].")
@click.option("--continual", is_flag=True,
              help="Three tasks in sequence (sentiment, topic, question type): forgetting and intruders per stage, "
                   "LoRA vs full fine-tuning.")
@overwrite_option
@json_option
@global_options
def command(out: str | None, continual: bool, overwrite: bool, as_json: bool) -> None:
    """Run the whole pipeline on a real pretrained model, on CPU, and write a report.

    Fine-tunes all-MiniLM-L6-v2 (installed with the `demo` extra) on a small
    text-classification set shipped with surgeon, with LoRA and with full
    fine-tuning; merges the adapter; diffs both against the base (task vectors,
    adapter equivalence check); finds intruder dimensions in both; scales the
    LoRA model's intruders by a sweep of lambdas; and measures task accuracy and
    forgetting (embedding drift from the base) before and after. Writes
    DIR/report.html (self-contained, plots embedded) and DIR/demo.json.
    A few minutes on a laptop CPU; nothing is downloaded.

    With --continual: the encoder goes through three tasks in sequence (sentiment,
    topic, question type), each stage continuing the last, with LoRA and with full
    fine-tuning; after each stage, the accuracy on every earlier task (the
    encoder read out with that task's head), drift, intruders per stage with the
    ones that persist and vanish, and the earlier tasks once the accumulated
    intruders are scaled down. Writes DIR/report.html and DIR/continual.json.

    \b
    Example:
      pip install -e ".[demo]"
      surgeon demo -o surgeon-demo
      xdg-open surgeon-demo/report.html
      surgeon demo --continual -o surgeon-demo-continual
    """
    with gc_paused():
        from surgeon.workflows.demo.run import run_continual_demo, run_demo

    if continual:
        report = run_continual_demo(out or "surgeon-demo-continual", overwrite=overwrite,
                                    on_stage=None if as_json else _announce)
    else:
        report = run_demo(out or "surgeon-demo", overwrite=overwrite, on_stage=None if as_json else _announce)
    if as_json:
        emit_json("demo", report.to_dict())
        return
    click.echo("")
    table(["result", "value", ""], [(h["label"], h["text"], h["detail"]) for h in report.headline])
    click.echo("")
    click.echo(f"report: {report.html}")
    click.echo(f"data:   {report.json}")
