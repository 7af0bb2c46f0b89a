"""SIGTERM and SIGHUP as Ctrl-C while a command writes, and a publish step no signal splits."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while a guard was active (cleanup runs as for Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum



_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into :class:`Interrupted` (a KeyboardInterrupt) for the block, in the main
    thread only, and only where the signal still has its default action; the previous handlers come
    back afterwards. A second signal during the cleanup is ignored, so cleanup finishes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum: int, frame: object) -> None:
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)

    previous = {}
    for sig in _SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back for a few system calls that must not be split (a publish).

    A recording handler replaces the current ones for the block (a signal mask would not do: the
    kernel may hand the signal to another thread); afterwards the previous handlers come back and a
    signal that arrived meanwhile is delivered again, to them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    sigs = (signal.SIGINT, *_SIGNALS)
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if arrived:
            os.kill(os.getpid(), arrived[0])  # now handled as it would have been (cleanup, exit code)
