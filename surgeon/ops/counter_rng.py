"""A counter-based random generator: the same (seed, name, element index) gives the same number everywhere.

Random masks (DARE, DELLA) must not depend on global RNG state, on the order tensors are
visited, on chunking or on the device. Each element's draw is a pure function of a 64-bit
key and its flat index: ``u = splitmix64(key + index·φ) >> 40`` scaled to [0, 1) with 24
bits, computed in numpy ``uint64`` arithmetic (wrap-around defined, no float rounding), so
the result is byte-identical on any machine. The key is a BLAKE2b hash of the seed and a
label (tensor name, input index, factor), so inputs and tensors draw independent streams.
"""

from __future__ import annotations

import hashlib

import numpy
import torch

_GOLDEN = numpy.uint64(0x9E3779B97F4A7C15)
_MUL1 = numpy.uint64(0xBF58476D1CE4E5B9)
_MUL2 = numpy.uint64(0x94D049BB133111EB)
_U24 = float(1 << 24)


def stream_key(seed: int, *label: object) -> int:
    """A 64-bit key for one stream: BLAKE2b of the seed and the label parts (e.g. tensor name, input index)."""
    text = "\x1f".join([str(int(seed)), *(str(part) for part in label)])
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def uniform24(key: int, start: int, count: int) -> numpy.ndarray:
    """Uniform draws on the grid k/2²⁴ in [0, 1) for flat indices ``start .. start+count-1``, float64 (exact)."""
    index = numpy.arange(start, start + count, dtype=numpy.uint64)
    with numpy.errstate(over="ignore"):
        z = numpy.uint64(key) + index * _GOLDEN
        z = (z ^ (z >> numpy.uint64(30))) * _MUL1
        z = (z ^ (z >> numpy.uint64(27))) * _MUL2
        z = z ^ (z >> numpy.uint64(31))
    return (z >> numpy.uint64(40)).astype(numpy.float64) / _U24


def bernoulli_mask(key: int, start: int, shape: tuple[int, ...], probability: float | torch.Tensor) -> torch.Tensor:
    """Keep-mask (bool, CPU) for a block of ``prod(shape)`` elements at flat offset ``start``: element i is kept
    when its draw is below ``probability`` (a number, or a tensor of ``shape`` compared in float64)."""
    count = 1
    for size in shape:
        count *= int(size)
    draws = uniform24(key, start, count).reshape(shape)
    if isinstance(probability, torch.Tensor):
        limit = probability.detach().to("cpu", torch.float64).numpy()
    else:
        limit = float(probability)
    return torch.from_numpy(draws < limit)
