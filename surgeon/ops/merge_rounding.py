"""One rounding of a float32 merge result to the output dtype, measured.

Works in chunks small enough to stay in cache, into preallocated buffers, so that
W + ΔW, the rounding and its statistics cost a few cheap passes instead of a dozen
trips through memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

CHUNK = 1 << 16
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class RoundingStats:
    """What rounding W' = W + ΔW to the output dtype kept of ΔW.

    ``delta_norm`` = ‖ΔW‖ (float32), ``lost_norm`` = ‖round(W') − W'‖, ``changed`` =
    elements whose stored bits in the output differ from the base's (cast to the output
    dtype), ``nonfinite`` = non-finite outputs.
    """

    numel: int
    delta_norm: float
    lost_norm: float
    changed: int
    nonfinite: int

    @property
    def lost_fraction(self) -> float:
        """‖round(W') − W'‖ / ‖ΔW‖ (0 when ΔW = 0)."""
        return self.lost_norm / self.delta_norm if self.delta_norm > 0 else 0.0


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


@torch.no_grad()
def round_merged(
    stored: torch.Tensor, out_dtype: torch.dtype, *, merged: torch.Tensor | None = None,
    deltas: Sequence[torch.Tensor | tuple[torch.Tensor, float]] = (), workers: int = 1,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, RoundingStats]:
    """Round W' once to ``out_dtype`` and measure it against the base W.

    ``stored``: W as stored (any float dtype). W' is ``merged`` (float32, W's shape) when given,
    else ``W.float() + deltas[0] + deltas[1] + ...`` (float32, W's shape), added in that order; a
    delta given as ``(D, s)`` is ``D * s``, scaled chunk by chunk (the same bits as scaling it whole).
    ``workers`` threads share the chunks (run torch single-threaded then: no barrier per chunk).
    ``out``: optional contiguous ``out_dtype`` buffer of W's numel for the result.
    Returns round(W') (W's shape, ``out_dtype``, W's device) and its statistics.
    """
    flat_s = stored.reshape(-1)
    if out is None:
        out = torch.empty(flat_s.shape, dtype=out_dtype, device=stored.device)
    out = out.reshape(-1)
    flat_d = [(d[0].reshape(-1), d[1]) if isinstance(d, tuple) else (d.reshape(-1), None) for d in deltas]
    job = _Job(flat_s, out, merged.reshape(-1) if merged is not None else None, flat_d)
    size = CHUNK if stored.device.type == "cpu" else max(1, flat_s.numel())
    starts = list(range(0, flat_s.numel(), size))
    if workers > 1 and len(starts) > 1:
        step = -(-len(starts) // workers)
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda k: job.run(starts[k : k + step], size), range(0, len(starts), step)))
    else:
        parts = [job.run(starts, size)]
    dsq, esq, changed = ([x for part in parts for x in part[j]] for j in range(3))
    rounds = out_dtype != torch.float32
    return out.reshape(stored.shape), _stats(out, dsq, esq if rounds else [], changed, screen=esq)


class _Job:
    """The chunk loop of :func:`round_merged`; each caller thread gets its own buffers."""

    def __init__(self, flat_s: torch.Tensor, out: torch.Tensor, flat_m: torch.Tensor | None,
                 flat_d: list[tuple[torch.Tensor, float | None]]) -> None:
        self.flat_s, self.out, self.flat_m, self.flat_d = flat_s, out, flat_m, flat_d

    def run(self, starts: list[int], size: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        flat_s, out, flat_m, flat_d = self.flat_s, self.out, self.flat_m, self.flat_d
        size = min(size, max(1, flat_s.numel()))
        m_buf = torch.empty(size, dtype=torch.float32, device=flat_s.device)
        e_buf, d_buf = torch.empty_like(m_buf), torch.empty_like(m_buf)
        x_buf = torch.empty(size, dtype=_BITS[out.element_size()], device=flat_s.device)
        cast_buf = None if flat_s.dtype == out.dtype else torch.empty(size, dtype=out.dtype, device=flat_s.device)
        rounds = out.dtype != torch.float32
        dsq, esq, changed = [], [], []
        for i in starts:
            s, o = flat_s[i : i + size], out[i : i + size]
            n = s.numel()
            m, e = m_buf[:n], e_buf[:n]
            if flat_m is None:
                m.copy_(s)  # mixed-dtype ops would allocate a converted copy per chunk: convert into buffers
                for delta, scale in flat_d:
                    d_chunk = delta[i : i + n] if scale is None else torch.mul(delta[i : i + n], scale, out=d_buf[:n])
                    m.add_(d_chunk)
                if len(flat_d) != 1:
                    d_chunk = e.copy_(s).neg_().add_(m)
            else:
                m = flat_m[i : i + n]
                d_chunk = e.copy_(s).neg_().add_(m)
            dsq.append(torch.dot(d_chunk, d_chunk))
            o.copy_(m)
            if rounds:
                e.copy_(o).sub_(m)
                esq.append(torch.dot(e, e))
            else:
                esq.append(torch.dot(m, m))  # not an error: a cheap screen for non-finite values
            base = s if cast_buf is None else cast_buf[:n].copy_(s)
            changed.append(torch.count_nonzero(torch.bitwise_xor(_bits(o), _bits(base), out=x_buf[:n])))
        return dsq, esq, changed


def _stats(out: torch.Tensor, dsq: list[torch.Tensor], esq: list[torch.Tensor], changed: list[torch.Tensor],
           *, screen: list[torch.Tensor]) -> RoundingStats:
    def total(parts: list[torch.Tensor]) -> float:
        return float(torch.stack(parts).double().sum()) if parts else 0.0

    delta_sq, lost_sq = total(dsq), total(esq)
    nonfinite = 0
    if not all(map(math.isfinite, (delta_sq, total(screen)))):
        nonfinite = out.numel() - int(torch.count_nonzero(torch.isfinite(out)))  # exact, only when the screen trips
    return RoundingStats(numel=out.numel(), delta_norm=delta_sq ** 0.5, lost_norm=lost_sq ** 0.5,
                         changed=int(total(changed)), nonfinite=nonfinite)
