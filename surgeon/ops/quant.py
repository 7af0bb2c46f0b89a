"""The 4-bit quantize-dequantize round trip of bitsandbytes (QLoRA's NF4 / FP4 base), as pure math.

A QLoRA adapter was trained against the dequantized 4-bit weights, not the original ones. To merge it
onto the model it saw, each base weight W goes through the same round trip first:

- W, widened to float32, is cut into blocks of ``blocksize`` (64) consecutive elements of the flattened
  tensor (the last block may be shorter); ``absmax`` is each block's largest |w|;
- each element is scaled into [-1, 1] (multiplied by 1/absmax; divided, for a short last block), and
  mapped to the nearest of the 16 values of the code (NF4: the normal-quantile code of the QLoRA paper;
  FP4: bitsandbytes' 1-sign/2-exponent/1-mantissa table), a value exactly between two codes going to
  the smaller;
- dequantized, it is ``code[q] * absmax`` in float32, then stored in the weight's own dtype (what
  bitsandbytes' ``dequantize_4bit`` returns);
- double quantization (``bnb_4bit_use_double_quant``) stores the absmax values themselves in 8 bits:
  minus their mean, in blocks of 256, each scaled by its own largest magnitude and mapped to (nearly) the
  nearest value of the signed 8-bit dynamic code; the round trip uses those dequantized absmax values.

Checked bit for bit against bitsandbytes 0.50 on the CPU (tests/test_base_quant.py). Its CUDA kernels
search the 8-bit code exactly, so an absmax lying within 1/65535 of a midpoint between two codes can
round the other way there (about one block in 10^4, with double quantization only).
"""

from __future__ import annotations

import torch

# The 16 NF4 values (QLoRA, Dettmers et al. 2023, Appendix E), ascending.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bits, bitsandbytes' bias) by 4-bit code. Code 8 dequantizes to -0.0
# (bitsandbytes' CPU and CUDA kernels); its table for finding the nearest code holds +0.0 there, which
# decides the order of the two zeros (tiny positive values take code 8).
FP4_CODE = (
    0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 0.5, 1 / 6, 0.25,
    -0.0, -1 / 192, -2 / 3, -1.0, -1 / 3, -0.5, -1 / 6, -0.25,
)
FP4_BOUNDS_CODE = (0.0, *FP4_CODE[1:8], 0.0, *FP4_CODE[9:])
QUANT_TYPES = ("nf4", "fp4")
DEFAULT_BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256  # double quantization's blocks of absmax values


def code_table(quant_type: str, *, for_bounds: bool = False) -> torch.Tensor:
    """The 16 float32 values of ``quant_type`` ("nf4" or "fp4"), indexed by 4-bit code (``for_bounds``:
    the table whose midpoints decide the nearest code; differs from the values for FP4 only)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, not {quant_type!r}")
    table = NF4_CODE if quant_type == "nf4" else FP4_BOUNDS_CODE if for_bounds else FP4_CODE
    return torch.tensor(table, dtype=torch.float32)


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic code (Dettmers 2015): for exponents 10^-6 ... 10^0, the midpoints of an
    evenly spaced fraction grid of 2^i + 1 points over [0.1, 1] (i = 0 ... 6), both signs, plus 0 and 1;
    256 float32 values, ascending."""
    values: list[float] = []
    for i in range(7):
        grid = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (-6 + i)  # applied in float32, as the code is tabulated
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, the elements scaled into [-1, 1]): full blocks times 1/absmax, a short last block
    divided by its absmax."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    return absmax, scaled


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into ``code`` of the value nearest each element; at an exact midpoint, the smaller value."""
    order = torch.argsort(code)
    ascending = code[order]
    bounds = (ascending[:-1] + ascending[1:]) / 2
    return order[torch.bucketize(scaled, bounds, out_int32=True)]


_LUT_STEPS = 65536  # bitsandbytes' CPU kernel finds the nearest 8-bit code on a grid of this many points


def _blockwise_8bit(values: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE) -> torch.Tensor:
    """``values`` (float32, 1-D) through 8-bit dynamic blockwise quantization and back, as bitsandbytes' CPU
    kernel does it: each scaled value (in [-1, 1]) is put on a grid of 65536 points, index
    trunc((v + 1)·0.5·65535 + 0.5), and each grid point maps to the code value nearest to it, which can be
    the neighbour of the value's own nearest code when the value lies within a grid step of a midpoint."""
    code = dynamic_code().to(values.device)
    mids = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_STEPS, dtype=torch.float32, device=values.device)) / (_LUT_STEPS - 1)
    lookup = torch.searchsorted(mids, grid, side="left")  # the codes whose midpoint below each grid point
    absmax = torch.stack([b.abs().max() for b in values.split(blocksize)])
    per = torch.repeat_interleave(absmax, blocksize)[: values.numel()]
    scaled = torch.clamp(values / torch.where(per > 0, per, 1.0), -1, 1)  # an all-zero block stays zero
    steps = ((scaled + 1.0) * 0.5 * (_LUT_STEPS - 1) + 0.5).to(torch.int64)
    return code[lookup[steps]] * per


@torch.no_grad()
def roundtrip_4bit(weight: torch.Tensor, quant_type: str, *, blocksize: int = DEFAULT_BLOCKSIZE,
                   double_quant: bool = False) -> torch.Tensor:
    """``weight`` (any float dtype, any shape) quantized to 4 bits and dequantized as bitsandbytes does;
    same shape and dtype as ``weight``."""
    if blocksize < 1:
        raise ValueError(f"blocksize must be positive, not {blocksize}")
    flat = weight.reshape(-1).to(torch.float32)
    code = code_table(quant_type).to(flat.device)
    absmax, scaled = _blocks(flat, blocksize)
    q = _nearest(scaled, code_table(quant_type, for_bounds=True).to(flat.device))
    if double_quant:
        offset = absmax.mean()
        absmax = _blockwise_8bit(absmax - offset) + offset
    per = torch.repeat_interleave(absmax, blocksize)[: flat.numel()]
    return (code[q] * per).view(weight.shape).to(weight.dtype)


@torch.no_grad()
def quantization_error(weight: torch.Tensor, roundtrip: torch.Tensor) -> float:
    """‖roundtrip − W‖ (float64 sum of float32 squares): what the 4-bit base moved each weight by."""
    diff = roundtrip.to(torch.float32) - weight.to(torch.float32)
    return float(diff.double().pow(2).sum().sqrt())
