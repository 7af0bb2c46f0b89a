"""`--nproc N` and torchrun: run a command on every rank of a process group, rank 0 speaking for all.

Under ``torchrun ... -m surgeon <command>`` the group comes from the environment. With
``--nproc N`` (and no group yet) the command starts N local processes through torch's own
elastic launcher (``torch.distributed.launcher.api.elastic_launch``, what torchrun uses) and
waits for them. Ranks other than 0 print nothing: rank 0 reports, writes JSON, plots, cards.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable
from contextlib import redirect_stdout
from typing import Any, TypeVar

import click

from surgeon.cli.common import State
from surgeon.errors import SurgeonError
from surgeon.io.signals import Interrupted
from surgeon.parallel.world import DEFAULT_TIMEOUT_S, SOLO, PeerLostError, World, detect, process_group
from surgeon.progress import set_progress

F = TypeVar("F", bound=Callable[..., Any])
CHILD_ENV = "SURGEON_NPROC_CHILD"
LOST_PEER_EXIT = 75  # a rank that lost its peers exits with this; the --nproc parent reports it
_AGENT_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, n))


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run ``python -m surgeon argv`` on ``nproc`` local ranks (gloo on CPU, nccl on GPUs); its exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    os.environ[CHILD_ENV] = "1"  # the ranks leave the report of a lost peer to this process
    env_threads = os.environ.get("OMP_NUM_THREADS")
    if env_threads is None:  # one BLAS thread per core per rank, not N × cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    quiet = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.distributed.launcher")]
    quiet += [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)  # modules set their own level
              if name.startswith(("torch.distributed.elastic.", "torch.distributed.launcher."))]
    levels = [log.level for log in quiet]
    for log in quiet:  # the ranks say what went wrong in one line; the agent's own log would repeat it
        log.setLevel(logging.CRITICAL)
    # torch's agent installs its own handlers (SignalException) and leaves them: ours come back afterwards
    handlers = {sig: signal.getsignal(sig) for sig in _AGENT_SIGNALS}
    try:
        elastic_launch(config, sys.executable)("-m", "surgeon", *argv)
    except ChildFailedError as exc:
        return _report_failure(exc)
    except SignalException as exc:  # SIGTERM/SIGHUP to this parent: torch's agent has stopped the ranks (each
        raise Interrupted(int(exc.sigval)) from None  # cleaned up as for Ctrl-C); one line, exit 128+n
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        os.environ.pop(CHILD_ENV, None)
        for log, level in zip(quiet, levels):
            log.setLevel(level)
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return 0


def _report_failure(exc: Any) -> int:
    """One line for a rank that died of a signal (a rank that raised has already said why)."""
    rank, failure = exc.get_first_failure()
    code = int(failure.exitcode or 1)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        click.echo(f"Error: rank {rank} was killed by {name} (pid {failure.pid}); the run stopped and nothing was "
                   "written. Run again: finished base decompositions are in the cache.", err=True)
        return 1
    if code == LOST_PEER_EXIT:
        timeout = os.environ.get("SURGEON_DIST_TIMEOUT", f"{DEFAULT_TIMEOUT_S:g}")
        click.echo(f"Error: rank {rank} stopped waiting for the other ranks: one of them hung past the collective "
                   f"timeout (SURGEON_DIST_TIMEOUT={timeout} s) or left; nothing was written.", err=True)
        return 1
    return code


def distributed_command(func: F) -> F:
    """Add ``--nproc`` and pass ``world`` (the process group this rank is in) to the command."""

    @click.option("--nproc", type=click.IntRange(min=1), default=None, metavar="N",
                  help="Run on N local processes (torch.distributed; gloo on CPU, nccl on GPUs). Under torchrun "
                       "the group comes from the environment instead.")
    @functools.wraps(func)
    def wrapper(*args: Any, nproc: int | None, **kwargs: Any) -> Any:
        world = detect()
        if nproc is not None and nproc > 1 and not world.distributed:
            code = launch_local(nproc, _strip_nproc(sys.argv[1:]))
            if code:
                raise click.exceptions.Exit(code)
            return None
        return _run_on_rank(func, world, args, kwargs)

    return wrapper  # type: ignore[return-value]


def _run_on_rank(func: Callable[..., Any], world: World, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not world.distributed:
        return func(*args, world=SOLO, **kwargs)
    child = os.environ.get(CHILD_ENV) == "1"
    try:
        with process_group(world):
            if world.is_main:
                return func(*args, world=world, **kwargs)
            State.quiet = True
            set_progress(False)
            with redirect_stdout(io.StringIO()):
                return func(*args, world=world, **kwargs)
    except (PeerLostError, KeyboardInterrupt):
        if world.is_main and not child:
            raise
        if child:  # the launcher is stopping the group: finish cleaning up, then leave without a word
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
        raise click.exceptions.Exit(LOST_PEER_EXIT) from None  # the --nproc parent says what happened
    except SurgeonError:
        if world.is_main:
            raise
        raise click.exceptions.Exit(1) from None  # rank 0 says it once for the group
