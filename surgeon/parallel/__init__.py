"""Many processes, one result: per-matrix work shared out over a torch.distributed process group.

Launched by ``torchrun ... -m surgeon <command>`` (the group comes from ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK`` in the environment) or by ``--nproc N`` on one machine
(:mod:`surgeon.parallel.launch`, through torch's own elastic launcher). The work is planned
as data first (a cost per item), shared out deterministically (:mod:`surgeon.parallel.share`),
and the results travel to rank 0 as JSON bytes in tensors (:mod:`surgeon.parallel.exchange`):
never pickle. Nothing here knows checkpoints; workflows hand in items and functions.
"""
