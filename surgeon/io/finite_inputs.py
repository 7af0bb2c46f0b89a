"""Refusing NaN/Inf in small inputs up front (adapter factors): one line naming the file and tensor.

A NaN in a LoRA factor spreads through a whole merged matrix (every row times every column), makes an
SVD fail to converge and turns an equivalence check into "max error inf"; the honest message names
the factor itself. Adapters are small next to a model, so reading every factor once is cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy

from surgeon.errors import NumericalError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.disk import show

_FLOATS = ("F16", "BF16", "F32", "F64")  # read through numpy: `merge` never imports torch

ADAPTER_FIX = ("the adapter is corrupt or its training diverged; re-download or re-train it "
               "(`surgeon inspect` lists its tensors)")


def refuse_non_finite_tensors(ckpt: Checkpoint, *, fix: str, names: list[str] | None = None) -> None:
    """Raise :class:`NumericalError` for the first floating tensor of ``ckpt`` (or of ``names``) that holds
    NaN or ±Inf, naming its file."""
    for name in names if names is not None else ckpt.keys():
        info = ckpt.info(name)
        if info.dtype not in _FLOATS or info.numel == 0:
            continue
        values = ckpt.float32_array(name)
        if bool(numpy.isfinite(values).all()):
            continue
        bad = int(values.size - numpy.isfinite(values).sum())
        if bad:
            where = Path(info.file)
            raise NumericalError(f"{show(where)}: tensor {name!r} holds {bad} NaN/Inf value(s) of {info.numel}; {fix}.")


def refuse_non_finite_adapter(weights: Checkpoint) -> None:
    """Every factor (and saved module) of an adapter's weights is finite, else one line naming it
    (not under ``--allow-non-finite``)."""
    from surgeon.io.output import current_guard

    guard = current_guard()
    if guard is not None and guard.allow_non_finite:
        return
    refuse_non_finite_tensors(weights, fix=ADAPTER_FIX)
