"""The native kernel's claim on every shape: wherever the merge routes a LoRA target to it (the measurement
of surgeon.ops.blas_agreement, made on this machine), it gives torch's bits, and wherever the measurement
says it does not, it really does not. Measured here against torch's own B·A over a grid of small shapes on
other random data than the measurement's, and end to end against peft's merge_and_unload() on tiny Linear /
Conv1D modules (10->20, 10->64, 20->2, 20->1, 1->8, rank 1 ... 512), with the kernel on and off."""

from __future__ import annotations

import numpy
import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from surgeon.ops import native_merge
from surgeon.ops.blas_agreement import trials, native_agrees
from surgeon.ops.native_merge import CHUNK
from surgeon.workflows.merge import merge

pytestmark = pytest.mark.skipif(native_merge.kernel() is None,
                                reason=f"the native kernel cannot be built here: {native_merge.build_error()}")

SIZES = (1, 2, 3, 5, 10, 20, 33, 64)
RANKS = (1, 2, 3, 8, 16, 33)


def _kernel_merge(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """round(W + scale·left·right) by the kernel, W float32 (rows × cols) in its stored layout."""
    raw = weight.contiguous().view(torch.uint8).numpy().reshape(-1)
    out = bytearray(weight.numel() * 4)

    def read(start, nbytes, buf):
        buf[:nbytes] = raw[start : start + nbytes].tobytes()
        return buf[:nbytes]

    def write(start, data):
        out[start : start + len(data)] = data

    factors = native_merge.LoraFactors(numpy.ascontiguousarray(left.numpy()), numpy.ascontiguousarray(right.numpy()),
                                       scale)
    native_merge.stream_lora_merge(native_merge.kernel(), weight.shape, "F32", "F32", [factors], read=read,
                                   write=write, workers=2)
    return torch.frombuffer(out, dtype=torch.float32).view(weight.shape).clone()


def _torch_merge(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                 fan_in_fan_out: bool) -> torch.Tensor:
    """peft's arithmetic: W + transpose(B @ A) * s."""
    delta = lora_B @ lora_A
    return weight + (delta.T if fan_in_fan_out else delta) * scale


def _agrees_on_new_data(out_f: int, in_f: int, rank: int, fan_in_fan_out: bool, gen: torch.Generator) -> bool:
    """Whether the kernel gives torch's bits on fresh draws (as many as the measurement takes: a product of
    one element can round the same in another order by chance)."""
    return all(_agrees_once(out_f, in_f, rank, fan_in_fan_out, gen) for _ in range(trials(out_f, in_f)))


def _agrees_once(out_f: int, in_f: int, rank: int, fan_in_fan_out: bool, gen: torch.Generator) -> bool:
    lora_A, lora_B = torch.randn(rank, in_f, generator=gen), torch.randn(out_f, rank, generator=gen)
    rows, cols = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
    weight = torch.randn(rows, cols, generator=gen)
    left, right = (lora_A.T, lora_B.T) if fan_in_fan_out else (lora_B, lora_A)
    ref = _torch_merge(weight, lora_A, lora_B, 0.75, fan_in_fan_out)
    got = _kernel_merge(weight, left, right, 0.75)
    if not torch.equal(got.view(torch.int32), ref.view(torch.int32)):
        bound = 4 * rank * torch.finfo(torch.float32).eps * float(ref.abs().max() + 1)
        assert float((got - ref).abs().max()) <= bound, (out_f, in_f, rank)  # another order of additions only
        return False
    return True


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_the_measurement_tells_where_the_kernel_gives_torchs_bits(fan_in_fan_out):
    gen = torch.Generator().manual_seed(14)
    agreed = 0
    for out_f in SIZES:
        for in_f in SIZES:
            for rank in RANKS:
                rows, cols = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
                measured = native_agrees(native_merge.kernel(), rows, cols, rank, fan_in_fan_out=fan_in_fan_out,
                                         chunk=CHUNK, workers=2)
                assert _agrees_on_new_data(out_f, in_f, rank, fan_in_fan_out, gen) == measured, (out_f, in_f, rank)
                agreed += measured
    print(f"the kernel gives torch's bits for {agreed} of {len(SIZES) ** 2 * len(RANKS)} small shapes here")


def test_the_measurement_follows_the_rank_across_blas_inner_blocks():
    """MKL's AVX-512 sgemm adds the rank in blocks of 384 (other CPUs: other blocks): whatever this machine's
    BLAS does, the measured answer holds on other data, below, at and above such an edge."""
    gen = torch.Generator().manual_seed(3)
    for rank in (255, 256, 257, 383, 384, 385, 386, 512):
        measured = native_agrees(native_merge.kernel(), 64, 64, rank, fan_in_fan_out=False, chunk=CHUNK, workers=2)
        assert _agrees_on_new_data(64, 64, rank, False, gen) == measured, rank


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(10, 20), nn.Linear(20, 2), nn.Linear(10, 64)
        self.head, self.wide = nn.Linear(20, 1), nn.Linear(1, 8)


@pytest.mark.parametrize("rank", [1, 2, 8, 16, 33, 512])
@pytest.mark.parametrize("engine", ["native", "torch"])
def test_tiny_modules_merge_as_peft_bit_for_bit(tmp_path, monkeypatch, rank, engine):
    """The shapes of the issue's report (Linear 10->20, 10->64, 20->2) and the gemv ones, through the
    whole `surgeon merge` with the kernel on and off: peft's bits either way."""
    monkeypatch.setenv("SURGEON_NATIVE", "1" if engine == "native" else "0")
    torch.manual_seed(rank)
    base = _Tiny()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    # A one-row product (head, wide) of a rank above ~192 is a gemv whose bits depend on torch's thread count
    # (peft's reference included), so the rank-512 case takes the matrix modules only (README, merge).
    targets = ["lin0", "lin1", "lin2"] + (["head", "wide"] if rank <= 192 else [])
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules=targets)
    peft.get_peft_model(_Tiny(), config).save_pretrained(tmp_path / "adapter")  # random A and B
    fresh = _Tiny()
    fresh.load_state_dict(base.state_dict())
    expected = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().state_dict()
    merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "out", dtype="fp32")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name, tensor in got.items():
        assert torch.equal(tensor.view(torch.int32), expected[name].view(torch.int32)), name
