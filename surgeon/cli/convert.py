"""`surgeon convert SRC -o OUT`."""

from __future__ import annotations

import click

from surgeon.cli.common import emit_json, global_options, human_bytes, info, json_option, max_shard_size_option, overwrite_option
from surgeon.workflows.convert import convert_checkpoint


@click.command("convert")
@click.argument("source")
@click.option("-o", "--output", "out", required=True, help="Output folder (or a .safetensors file).")
@click.option("--dtype", default="auto", show_default=True, help="Cast floating tensors: auto (keep), fp32, fp16, bf16.")
@max_shard_size_option
@overwrite_option
@json_option
@global_options
def command(source: str, out: str, dtype: str, max_shard_size: str, overwrite: bool, as_json: bool) -> None:
    """Stream a checkpoint into a new one: reshard it, or cast it once.

    Tensors that are not cast are copied byte for byte. Config and tokenizer
    files come along; provenance is recorded.

    \b
    Example:
      surgeon convert ./model -o ./model-resharded --max-shard-size 2GB
      surgeon convert ./model -o ./model-bf16 --dtype bf16
    """
    report = convert_checkpoint(source, out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
    if as_json:
        emit_json("convert", report.to_dict())
        return
    info(f"wrote {report.output}: {report.tensors} tensors ({report.copied} copied, {report.cast} cast), "
         f"{human_bytes(report.bytes_written)} in {len(report.shards)} file(s)")
