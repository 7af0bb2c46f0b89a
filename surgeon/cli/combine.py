"""`surgeon combine ADAPTER[:W]... -o OUT --method M`."""

from __future__ import annotations

import click

from surgeon.cli.common import emit_json, global_options, human_bytes, info, json_option, overwrite_option
from surgeon.cli.hub_options import hub_options, push_after, push_to_option
from surgeon.cli.lazy import gc_paused
from surgeon.cli.parallel import distributed_command
from surgeon.parallel.world import World
from surgeon.errors import OptionError
from surgeon.workflows.combine import COMBINATIONS, CombineOptions
from surgeon.workflows.convert import parse_dtype


def _rank(text: str | None) -> int | float | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise OptionError(f"--svd-rank {text!r}: give an int rank (16) or an energy fraction (0.9).") from None


@click.command("combine")
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER[:W]...")
@click.option("-o", "--output", "out", required=True, help="Output adapter folder.")
@click.option("--method", default="svd", show_default=True, type=click.Choice(list(COMBINATIONS)),
              help="peft's add_weighted_adapter combination_type.")
@click.option("--density", type=float, default=None, help="Fraction kept (ties, dare_*, magnitude_prune and their _svd).")
@click.option("--svd-rank", default=None, help="Rank of the _svd results (default: the largest input rank); "
              "converting one adapter also takes an energy fraction, e.g. 0.9.")
@click.option("--svd-clamp", type=float, default=None, help="Quantile at which the SVD factors are clamped, e.g. 0.99.")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
              help="Sign election of ties and dare_ties.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the DARE masks (same seed, same bytes, on any machine).")
@click.option("--base", default=None, help="Base model; only needed to convert a non-LoRA adapter (LoHa, LoKr, ...).")
@click.option("--dtype", default="auto", show_default=True, help="Factor dtype: auto (the first adapter's), fp32, bf16, fp16.")
@overwrite_option
@hub_options
@push_to_option
@json_option
@global_options
@distributed_command
def command(adapters: tuple[str, ...], out: str, method: str, density: float | None, svd_rank: str | None,
            svd_clamp: float | None, majority_sign: str, seed: int, base: str | None, dtype: str, overwrite: bool,
            push_to: str | None, private: bool, as_json: bool, world: World) -> None:
    """Combine LoRA adapters into one, as peft's add_weighted_adapter.

    Each ADAPTER is a PEFT adapter folder, optionally followed by :W (its
    weight; negative subtracts). linear, ties, dare_linear, dare_ties and
    magnitude_prune mix the factors and need equal ranks; cat stacks them
    (ranks add up, exact); svd and the *_svd types factor the combined ΔW
    again to --svd-rank. The result has peft's r = lora_alpha = new rank and
    loads with PeftModel.from_pretrained. One adapter with --method svd is
    converted to a LoRA of rank --svd-rank instead (peft's convert_to_lora;
    LoHa, LoKr, VeRA, AdaLoRA, IA3, DoRA, HiRA given --base).

    \b
    Example:
      surgeon combine ./lora-math:0.7 ./lora-code:0.3 --method cat -o ./lora-mix
      surgeon combine ./lora-math ./lora-code --method ties_svd --density 0.5 --svd-rank 16 -o ./lora-ties
      surgeon combine ./lora-a ./lora-b ./lora-c --method ties_svd --svd-rank 32 -o ./mix --nproc 4
      surgeon combine ./loha-adapter --method svd --svd-rank 0.9 --base ./base -o ./as-lora
    """
    with gc_paused():
        from surgeon.workflows.combine.run import combine_adapters, describe

    options = CombineOptions(method=method, density=density, svd_rank=_rank(svd_rank), svd_clamp=svd_clamp,
                             majority_sign=majority_sign, seed=seed, dtype=parse_dtype(dtype))
    report = combine_adapters(list(adapters), out, options=options, base=base, overwrite=overwrite, world=world)
    pushed = push_after(out, push_to, private=private, as_json=as_json) if world.is_main else None
    if as_json:
        emit_json("combine", {**report.to_dict(), "push": pushed.to_dict() if pushed else None})
        return
    info(f"wrote {report.output} = {describe(report)} ({report.combination}): r = lora_alpha = {report.r}, "
         f"{report.modules} modules, {human_bytes(report.bytes_written)}")
