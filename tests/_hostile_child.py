"""`python tests/_hostile_child.py POINT surgeon-args...`: run the real surgeon CLI, but stop at POINT
(print ``AT POINT`` and sleep) so that a test can send a real signal at a known moment.

Nothing is replaced: each hook calls the real method and only adds the pause. Points:
``open`` (writer made, lock held, nothing written), ``write`` (first shard's header written into an
anonymous file), ``staged`` (shards linked into the staging folder, before validation), ``publish``
(inside the publish step, signals held back), ``lock`` (the target's lock file made and locked, not yet
recorded as held: signals held back), ``scratch`` (finetune: scratch folder made, before
training), ``side`` (a side output written into its temporary file, before it is linked into place), ``old`` (fallback publish without RENAME_EXCHANGE: after the old output was renamed away).
"""

from __future__ import annotations

import os
import sys
import time


def _pause(tag: str) -> None:
    print(f"AT {tag}", flush=True)
    time.sleep(1.5 if tag in ("publish", "lock") else 60)  # there signals are held back: the sleep runs out


def _wrap(owner: object, name: str, tag: str, *, before: bool = False) -> None:
    real = getattr(owner, name)

    def hooked(*args: object, **kwargs: object) -> object:
        if before:
            _pause(tag)
        result = real(*args, **kwargs)
        if not before:
            _pause(tag)
        return result

    setattr(owner, name, hooked)


def install(point: str) -> None:
    from surgeon.io import staging, writer

    if point == "open":
        _wrap(writer.CheckpointWriter, "__enter__", point)
    elif point == "write":
        _wrap(writer.CheckpointWriter, "_open_shard", point)
    elif point == "staged":
        _wrap(writer.CheckpointWriter, "_validate", point, before=True)
    elif point == "publish":
        _wrap(writer, "publish", point, before=True)
    elif point == "lock":  # the lock file made and locked, not yet recorded as held (signals held back there)
        import types

        from surgeon.io import locks

        real_fcntl = locks.fcntl

        def flock(fd: int, op: int) -> None:
            real_fcntl.flock(fd, op)
            if op & real_fcntl.LOCK_EX and not getattr(flock, "paused", False):
                flock.paused = True  # type: ignore[attr-defined]
                _pause(point)

        locks.fcntl = types.SimpleNamespace(flock=flock, LOCK_EX=real_fcntl.LOCK_EX,  # type: ignore[assignment]
                                            LOCK_NB=real_fcntl.LOCK_NB, LOCK_UN=real_fcntl.LOCK_UN)
    elif point == "scratch":
        from surgeon.workflows.train import finetune

        _wrap(finetune, "_run", point, before=True)
    elif point == "side":  # a side output (report, page, JSON) written into its temporary file, not yet linked
        import contextlib

        from surgeon.io import output

        real_side = output.side_file

        @contextlib.contextmanager
        def side_file(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
            with real_side(*args, **kwargs) as tmp:
                yield tmp
                _pause(point)

        output.side_file = side_file  # type: ignore[assignment]
    elif point == "old":
        staging.exchange = lambda a, b: False  # as on a file system without RENAME_EXCHANGE
        real_rename = os.rename

        def rename(src: object, dst: object, *args: object, **kwargs: object) -> None:
            real_rename(src, dst, *args, **kwargs)
            if "-old" in os.fspath(dst):  # type: ignore[arg-type]
                _pause(point)

        staging.os.rename = rename  # type: ignore[attr-defined]  # the child's own os module
    else:
        raise SystemExit(f"unknown point {point}")


if __name__ == "__main__":
    install(sys.argv[1])
    from surgeon.cli.main import main

    main(sys.argv[2:])
