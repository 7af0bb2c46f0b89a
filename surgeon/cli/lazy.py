"""Heavy imports wait for the run: a command's module imports nothing that loads torch, so `--help` is quick.

``cli/main`` imports a command's module inside :func:`gc_paused`; the command's body imports its
workflow (and with it torch, transformers, peft) inside :func:`gc_paused` too.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from contextvars import ContextVar

# True only inside main(), the entry point of a `surgeon` process: then freezing the import-time objects
# out of later collections is ours to do. Called in-process (CliRunner, a script), no gc state changes.
OWN_PROCESS: ContextVar[bool] = ContextVar("surgeon_own_process", default=False)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No collections for the block (importing torch makes ~10^5 long-lived objects and no garbage:
    collecting costs ~0.3 s); gc's previous state comes back afterwards."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            if OWN_PROCESS.get():
                gc.freeze()  # what the imports made lives as long as the process
            gc.enable()
