"""The `surgeon` command group: lazy command loading and the one place errors become exit codes."""

from __future__ import annotations

import errno
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import click

from surgeon import __version__
from surgeon.cli.common import State, global_options
from surgeon.cli.lazy import OWN_PROCESS, gc_paused
from surgeon.errors import SurgeonError
from surgeon.io.output import Interrupted, disk_error, output_guard
from surgeon.progress import set_progress

# command name -> module exposing `command`. Modules load only when used.
COMMANDS: dict[str, str] = {
    "inspect": "surgeon.cli.inspect",
    "convert": "surgeon.cli.convert",
    "merge": "surgeon.cli.merge",
    "diff": "surgeon.cli.diff",
    "apply": "surgeon.cli.apply",
    "combine": "surgeon.cli.combine",
    "extract-lora": "surgeon.cli.extract_lora",
    "spectrum": "surgeon.cli.spectrum",
    "intruders": "surgeon.cli.intruders",
    "scale-intruders": "surgeon.cli.scale_intruders",
    "push": "surgeon.cli.push",
    "finetune": "surgeon.cli.finetune",
    "eval": "surgeon.cli.eval",
    "demo": "surgeon.cli.demo",
}


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _load(name: str) -> click.Command | None:
    module_name = COMMANDS[name]
    if module_name in sys.modules:
        return sys.modules[module_name].command
    with gc_paused():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # command not built (yet); anything else is a real error
                return None
            raise
    return module.command


def _one_line(text: str) -> str:
    """Messages stay one line even when a file name holds a newline."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class SurgeonGroup(click.Group):
    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        # Flags are process-global; start each invocation clean (matters when called in-process).
        State.debug = False
        State.quiet = False
        set_progress(None)
        return super().make_context(info_name, args, parent=parent, **extra)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if _load(name) is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return _load(cmd_name) if cmd_name in COMMANDS else None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with output_guard():  # inputs noted, output locks, SIGTERM/SIGHUP cleaned up like Ctrl-C
                return super().invoke(ctx)
        except SurgeonError as exc:
            if State.debug:
                raise
            click.echo(f"Error: {_one_line(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            converted = disk_error(exc, Path(exc.filename or "output")) if exc.errno in _DISK_ERRNOS else exc
            if State.debug or not isinstance(converted, SurgeonError):
                raise
            click.echo(f"Error: {_one_line(str(converted))}", err=True)
            ctx.exit(converted.exit_code)
        except KeyboardInterrupt as exc:
            if State.debug:
                raise
            if isinstance(exc, Interrupted):
                if os.environ.get("SURGEON_NPROC_CHILD") == "1":  # a rank stopped by `--nproc`: its parent says why
                    ctx.exit(128 + exc.signum)
                click.echo(f"Interrupted by {exc}; nothing partial was left.", err=True)
                ctx.exit(128 + exc.signum)
            click.echo("Interrupted; nothing was written.", err=True)
            ctx.exit(130)


@click.group(cls=SurgeonGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="surgeon")
@global_options
def cli() -> None:
    """Model surgery on safetensors checkpoints, tensor by tensor.

    Merge PEFT adapters, diff fine-tunes into task vectors, look at weight
    spectra, find and rescale intruder dimensions, and publish the result.

    \b
    Example:
      surgeon inspect ./my-model
    """


def main(argv: list[str] | None = None) -> None:
    """The `surgeon` process: like ``cli.main`` plus the process-wide gc freeze after imports."""
    token = OWN_PROCESS.set(True)
    try:
        cli.main(args=argv, prog_name="surgeon")
    finally:
        OWN_PROCESS.reset(token)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
