"""One rounding of a float32 merge result to the output dtype, measured.

Works in chunks small enough to stay in cache, into preallocated buffers, so that
W + ΔW, the rounding and its statistics cost a few cheap passes instead of a dozen
trips through memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy
import torch

from surgeon.ops.threads import torch_threads
from surgeon.ops.native_merge import (  # noqa: F401 - MIN_ROWS re-exported
    CHUNK,
    MIN_ROWS,
    RoundingStats,
    row_spans,
    run_interleaved,
)

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


Delta = torch.Tensor | tuple[torch.Tensor, float] | Callable[[int, int, torch.Tensor], torch.Tensor]


@torch.no_grad()
def round_merged(
    stored: torch.Tensor, out_dtype: torch.dtype, *, merged: torch.Tensor | None = None,
    deltas: Sequence[Delta] = (), workers: int = 1, out: torch.Tensor | None = None,
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
    size = CHUNK if stored.device.type == "cpu" else max(1, flat_s.numel())
    job = _Job(lambda i, n, _: flat_s[i : i + n], flat_s.dtype, out_dtype, stored.device, deltas,
               merged.reshape(-1) if merged is not None else None, out=out)
    stats = job.run_all(_spans(flat_s.numel(), size), workers)
    return out.reshape(stored.shape), stats


@torch.no_grad()
def stream_merged(
    shape: Sequence[int], stored_dtype: torch.dtype, out_dtype: torch.dtype, *,
    read: Callable[[int, int, torch.Tensor], torch.Tensor], deltas: Sequence[Delta],
    write: Callable[[int, torch.Tensor], None], workers: int = 1, chunk: int = CHUNK,
    pool: ThreadPoolExecutor | None = None,
) -> RoundingStats:
    """:func:`round_merged` without a whole tensor anywhere: chunk by chunk, ``read(start, n, buf)`` gives
    W's flat elements [start, start+n) (``buf``: a byte buffer it may fill), each delta is a tensor, a
    ``(D, s)`` pair or a function ``fill(start, n, buf) -> ΔW[start:start+n]`` (``buf``: float32 scratch),
    and ``write(start, rounded)`` receives the output while it is still in cache. Chunks cover whole rows
    (of the last dimension), at least ``MIN_ROWS`` of them, so that a delta may be computed row block by
    row block with the same bits as whole. Same arithmetic, same bits, same statistics. ``pool``: an
    executor of at least ``workers`` threads to reuse across tensors."""
    cols, rows = row_spans(shape, chunk)
    spans = [(r * cols, n * cols) for r, n in rows]
    job = _Job(read, stored_dtype, out_dtype, torch.device("cpu"), deltas, None, write=write)
    return job.run_all(spans, workers, pool)




def _spans(numel: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(size, numel - i)) for i in range(0, numel, size)]


class _Job:
    """The chunk loop shared by :func:`round_merged` and :func:`stream_merged`; each thread gets its own buffers."""

    def __init__(self, read: Callable[[int, int, torch.Tensor], torch.Tensor], stored_dtype: torch.dtype,
                 out_dtype: torch.dtype, device: torch.device, deltas: Sequence[Delta],
                 flat_m: torch.Tensor | None, *, out: torch.Tensor | None = None,
                 write: Callable[[int, torch.Tensor], None] | None = None) -> None:
        self.read, self.stored_dtype, self.out_dtype, self.device = read, stored_dtype, out_dtype, device
        self.deltas = [d if callable(d) else (d[0].reshape(-1), d[1]) if isinstance(d, tuple) else (d.reshape(-1), None)
                       for d in deltas]
        self.flat_m, self.out, self.write = flat_m, out, write

    def run_all(self, spans: list[tuple[int, int]], workers: int, pool: ThreadPoolExecutor | None = None) -> RoundingStats:
        shared = workers > 1 and len(spans) > 1 and self.device.type == "cpu"
        with torch_threads(1 if shared else None):  # the threads share the chunks: no per-chunk barrier
            parts = run_interleaved(self.run, spans, workers, pool)
        dsq, esq, changed = ([x for part in parts for x in part[j]] for j in range(3))
        numel = sum(n for _, n in spans)
        rounds = self.out_dtype != torch.float32
        if self.out is not None:  # exact count over the whole output, only asked when the cheap screen trips
            count = lambda: self.out.numel() - int(torch.count_nonzero(torch.isfinite(self.out)))
        else:  # streamed: counted chunk by chunk as they went
            count = lambda: sum(part[3] for part in parts)
        return _stats(numel, dsq, esq if rounds else [], changed, screen=esq, nonfinite=count)

    def run(self, spans: list[tuple[int, int]]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], int]:
        size = max((n for _, n in spans), default=1)
        dev, out_dtype = self.device, self.out_dtype
        m_buf = torch.empty(size, dtype=torch.float32, device=dev)
        e_buf, d_buf = torch.empty_like(m_buf), torch.empty_like(m_buf)
        x_buf = torch.empty(size, dtype=_BITS[out_dtype.itemsize], device=dev)
        # bytes for ``read`` to fill: only when streaming (in memory, ``read`` slices W and needs none)
        r_buf = torch.empty(size * self.stored_dtype.itemsize, dtype=torch.uint8, device=dev) if self.write else None
        o_buf = torch.empty(size, dtype=out_dtype, device=dev) if self.out is None else None
        cast_buf = None if self.stored_dtype == out_dtype else torch.empty(size, dtype=out_dtype, device=dev)
        rounds = out_dtype != torch.float32
        on_cpu = dev.type == "cpu"
        x_np_buf = x_buf.numpy() if on_cpu else None
        flat_m, deltas = self.flat_m, self.deltas
        dsq, esq, changed, bad = [], [], [], 0
        for i, n in spans:
            s = self.read(i, n, r_buf)
            o = self.out[i : i + n] if o_buf is None else o_buf[:n]
            m, e = m_buf[:n], e_buf[:n]
            if flat_m is None:
                m.copy_(s)  # mixed-dtype ops would allocate a converted copy per chunk: convert into buffers
                for delta in deltas:
                    if callable(delta):
                        d_chunk = delta(i, n, d_buf[:n])
                    else:
                        d_chunk = delta[0][i : i + n] if delta[1] is None else torch.mul(
                            delta[0][i : i + n], delta[1], out=d_buf[:n])
                    m.add_(d_chunk)
                if len(deltas) != 1:
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
            if on_cpu:  # numpy's integer xor and count are vectorised, torch's count is not: 3x cheaper
                x_np = x_np_buf[:n]
                numpy.bitwise_xor(_bits(o).numpy(), _bits(base).numpy(), out=x_np)
                changed.append(numpy.count_nonzero(x_np))
            else:
                changed.append(torch.count_nonzero(torch.bitwise_xor(_bits(o), _bits(base), out=x_buf[:n])))
            if self.write is not None:
                if not math.isfinite(float(esq[-1]) + float(dsq[-1])):  # count now: the chunk is gone after
                    bad += n - int(torch.count_nonzero(torch.isfinite(o)))
                self.write(i, o)
        return dsq, esq, changed, bad


def _stats(numel: int, dsq: list[torch.Tensor], esq: list[torch.Tensor], changed: list[torch.Tensor],
           *, screen: list[torch.Tensor], nonfinite: Callable[[], int]) -> RoundingStats:
    def total(parts: list[torch.Tensor]) -> float:
        return float(torch.stack([torch.as_tensor(p) for p in parts]).double().sum()) if parts else 0.0

    delta_sq, lost_sq = total(dsq), total(esq)
    bad = 0
    if not all(map(math.isfinite, (delta_sq, total(screen)))):
        bad = nonfinite()
    return RoundingStats(numel=numel, delta_norm=delta_sq ** 0.5, lost_norm=lost_sq ** 0.5,
                         changed=int(total(changed)), nonfinite=bad)
