"""What every command shares: global flags, JSON output, tables, sizes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from surgeon import __version__
from surgeon.progress import set_progress

F = TypeVar("F", bound=Callable[..., Any])
JSON_SCHEMA_VERSION = 1


class State:
    debug = False
    quiet = False


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        State.debug = True


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        State.quiet = True
        set_progress(False)


def global_options(func: F) -> F:
    """--debug and -q/--quiet, accepted before or after the command name."""
    func = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="Show full tracebacks on errors.")(func)
    func = click.option("-q", "--quiet", is_flag=True, expose_value=False, is_eager=True, callback=_set_quiet,
                        help="No progress bars or chatter.")(func)
    return func


max_shard_size_option = click.option("--max-shard-size", default="5GB", show_default=True,
                                     help="Largest shard, e.g. 5GB, 500MB, 2GiB.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def _allow_non_finite(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    from surgeon.io.output import current_guard

    guard = current_guard()
    if value and guard is not None:
        guard.allow_non_finite = True


allow_non_finite_option = click.option(
    "--allow-non-finite", is_flag=True, expose_value=False, callback=_allow_non_finite,
    help="Write NaN/Inf values into the output instead of refusing them (refused by default, naming the tensor).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report on stdout.")


def emit_json(command: str, payload: dict[str, Any]) -> None:
    """Print ``{"command", "schema", "surgeon_version", ...payload}`` as JSON on stdout."""
    body = {"command": command, "schema": JSON_SCHEMA_VERSION, "surgeon_version": __version__, **payload}
    click.echo(json.dumps(body, indent=2, default=str))


def info(message: str) -> None:
    """Chatter on stderr, silenced by -q."""
    if not State.quiet:
        click.echo(message, err=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def human_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, file: Any = None) -> None:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = file or sys.stdout
    for i, row in enumerate(cells):
        click.echo("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip(), file=out)
        if i == 0:
            click.echo("  ".join("-" * w for w in widths), file=out)
