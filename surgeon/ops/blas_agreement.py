"""Whether a streamed LoRA merge gives the bits of peft's whole-tensor product, measured on this machine.

peft merges a LoRA as ``W + transpose(B @ A) * s``: one torch GEMM of the whole (out × in) product, on
torch's default thread count. Which kernel the BLAS takes for that GEMM, and so the order in which each
element's rank terms are added, depends on the CPU, the BLAS build, the shape and the thread count, not on
the values: MKL on Intel AVX-512 adds every element as one fused multiply-add chain except for one-row or
one-column products and ranks above 384; MKL on an AMD EPYC also takes other kernels for products with
few rows or columns, and for the last 1-3 rows of a short call, some of them depending on the thread
count. So neither of surgeon's two streamed routes can be proved exact from a rule written down once:

- the native kernel (``native/merge_rows.c``) computes every element as one FMA chain;
- the torch stream computes the product one block of rows at a time (other GEMM calls, other shapes).

Each probe here runs the real route on random factors of the real shape (the same block partition, the same
worker count) and compares its output with the whole product computed as peft computes it, at the caller's
torch thread count. A route that agrees is exact for any values of that shape; one that does not is not
used for that shape (the merge then computes the product whole, as peft). Pure functions: persisting the
answers is the workflow's business (``surgeon.workflows.merge.exactness``).
"""

from __future__ import annotations

import ctypes

import numpy
import torch

from surgeon.ops import native_merge
from surgeon.ops.lora import lora_delta, lora_delta_rows
from surgeon.ops.merge_rounding import stream_merged

SCALE = 0.75  # any scale: the products are compared after scaling, as peft scales them
MIN_ELEMENTS = 1 << 14  # a product of few elements is tried on several draws: another order of additions
MAX_TRIALS = 64  # rounds like the chain's for one element by chance, not for thousands


def trials(rows: int, cols: int) -> int:
    return max(1, min(MAX_TRIALS, -(-MIN_ELEMENTS // max(1, rows * cols))))


def _factors(rows: int, cols: int, rank: int, fan_in_fan_out: bool, trial: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (A, B) of a module whose weight is stored (rows × cols), seeded by the shape and the trial."""
    out_f, in_f = (cols, rows) if fan_in_fan_out else (rows, cols)
    gen = torch.Generator().manual_seed(rows * 1_000_003 + cols * 101 + rank * 7 + fan_in_fan_out + trial * 7919)
    return torch.randn(rank, in_f, generator=gen), torch.randn(out_f, rank, generator=gen)


# The base W = 0 in both probes: a route's float32 output is then exactly its scaled product.

def _zero_bytes(start: int, nbytes: int, buf: memoryview) -> memoryview:
    numpy.asarray(buf[:nbytes])[:] = 0
    return buf[:nbytes]


def _zero_floats(start: int, n: int, buf: torch.Tensor) -> torch.Tensor:
    return buf[: 4 * n].zero_().view(torch.float32)


def native_agrees(lib: ctypes.CDLL, rows: int, cols: int, rank: int, *, fan_in_fan_out: bool, chunk: int,
                  workers: int) -> bool:
    """Whether the native kernel, merging a LoRA of ``rank`` into a float32 (rows × cols) weight block by
    block (``chunk``, ``workers``), gives peft's whole-product bits."""
    return all(_native_trial(lib, rows, cols, rank, fan_in_fan_out, chunk, workers, t) for t in range(trials(rows, cols)))


def _native_trial(lib: ctypes.CDLL, rows: int, cols: int, rank: int, fan_in_fan_out: bool, chunk: int, workers: int,
                  trial: int) -> bool:
    lora_A, lora_B = _factors(rows, cols, rank, fan_in_fan_out, trial)
    whole = lora_delta(lora_A, lora_B, SCALE, fan_in_fan_out=fan_in_fan_out)
    expected = memoryview(numpy.ascontiguousarray(whole.numpy()).view(numpy.uint8).reshape(-1))
    factors = native_merge.LoraFactors.of(lora_A.numpy(), lora_B.numpy(), SCALE, fan_in_fan_out=fan_in_fan_out)
    same = [True]

    def write(start: int, data: memoryview) -> None:
        if bytes(data) != bytes(expected[start : start + len(data)]):
            same[0] = False

    native_merge.stream_lora_merge(lib, (rows, cols), "F32", "F32", [factors], read=_zero_bytes, write=write,
                                   workers=workers, chunk=chunk)
    return same[0]


def blocks_agree(rows: int, cols: int, rank: int, *, fan_in_fan_out: bool, chunk: int, workers: int) -> bool:
    """Whether the torch stream, computing B·A for one block of rows at a time (``chunk``, ``workers``, as
    :func:`surgeon.ops.merge_rounding.stream_merged` shares them), gives peft's whole-product bits."""
    return all(_blocks_trial(rows, cols, rank, fan_in_fan_out, chunk, workers, t) for t in range(trials(rows, cols)))


def _blocks_trial(rows: int, cols: int, rank: int, fan_in_fan_out: bool, chunk: int, workers: int, trial: int) -> bool:
    lora_A, lora_B = _factors(rows, cols, rank, fan_in_fan_out, trial)
    whole = lora_delta(lora_A, lora_B, SCALE, fan_in_fan_out=fan_in_fan_out).reshape(-1)
    same = [True]

    def write(start: int, block: torch.Tensor) -> None:
        if not torch.equal(block, whole[start : start + block.numel()]):
            same[0] = False

    def fill(start: int, n: int, buf: torch.Tensor) -> torch.Tensor:
        return lora_delta_rows(lora_A, lora_B, SCALE, slice(start // cols, (start + n) // cols),
                               fan_in_fan_out=fan_in_fan_out, out=buf)

    stream_merged((rows, cols), torch.float32, torch.float32, read=_zero_floats, deltas=[fill], write=write,
                  workers=workers, chunk=chunk)
    return same[0]


__all__ = ["SCALE", "blocks_agree", "native_agrees"]
