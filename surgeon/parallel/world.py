"""The process group: who we are (rank, size, device), set up from the environment torchrun leaves."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from surgeon.errors import DistributedError

DEFAULT_TIMEOUT_S = 3600.0  # the longest a rank waits at a collective (a peer still computing, or gone)
TIMEOUT_ENV = "SURGEON_DIST_TIMEOUT"


class PeerLostError(DistributedError):
    """A collective failed: another rank died, hung past the timeout, or left early."""


@dataclass(frozen=True)
class World:
    """One process of ``size``. ``backend`` None: no process group (a plain one-process run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


SOLO = World()


def _int(env: Mapping[str, str], key: str) -> int:
    text = env.get(key, "")
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{key}={text!r} in the environment is not an integer; launch with torchrun, "
                               "which sets WORLD_SIZE, RANK and LOCAL_RANK.") from None


def detect(env: Mapping[str, str] | None = None, *, cuda: bool | None = None) -> World:
    """The world the environment describes: SOLO unless WORLD_SIZE > 1 (nccl on cuda:LOCAL_RANK with GPUs, else gloo)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env or _int(env, "WORLD_SIZE") <= 1:
        return SOLO
    size, rank, local = _int(env, "WORLD_SIZE"), _int(env, "RANK"), _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
    if not 0 <= rank < size:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={size}; check the launcher's arguments.")
    timeout = float(env.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        return World(rank, size, local, "nccl", f"cuda:{local}", timeout)
    return World(rank, size, local, "gloo", "cpu", timeout)


@contextmanager
def process_group(world: World) -> Iterator[World]:
    """Join the group for the duration of a command (no-op for SOLO); leave it afterwards."""
    if not world.distributed:
        yield world
        return
    import torch.distributed as dist

    if world.device.startswith("cuda"):
        import torch

        torch.cuda.set_device(world.local_rank)
    try:
        dist.init_process_group(world.backend, rank=world.rank, world_size=world.size,
                                timeout=_dt.timedelta(seconds=world.timeout_s))
    except Exception as exc:  # DistStoreError, a timeout, a refused rendezvous
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise PeerLostError(f"rank {world.rank}: could not join the process group of {world.size} ({first}); check "
                            "that every rank started and can reach MASTER_ADDR:MASTER_PORT.") from None
    try:
        yield world
    finally:
        dist.destroy_process_group()
