"""The native kernel's claim on every shape: wherever the merge routes a LoRA target to it
(surgeon.ops.native_shapes.native_exact), it gives torch's bits; the shapes where torch's BLAS takes
another kernel (one-row/one-column products, ranks above 384) take the torch path. Measured here
against torch's own B·A over a grid of small shapes, and end to end against peft's merge_and_unload()
on tiny Linear / Conv1D modules (10->20, 10->64, 20->2, 20->1, 1->8, rank 1 ... 512)."""

from __future__ import annotations

import numpy
import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from surgeon.ops import native_merge
from surgeon.ops.native_shapes import MAX_EXACT_RANK, native_exact
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
                                   write=write)
    return torch.frombuffer(out, dtype=torch.float32).view(weight.shape).clone()


def _torch_merge(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                 fan_in_fan_out: bool) -> torch.Tensor:
    """peft's arithmetic: W + transpose(B @ A) * s."""
    delta = lora_B @ lora_A
    return weight + (delta.T if fan_in_fan_out else delta) * scale


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_kernel_equals_torch_wherever_the_rule_sends_a_shape_to_it(fan_in_fan_out):
    gen = torch.Generator().manual_seed(14)
    exact = measured = 0
    for out_f in SIZES:
        for in_f in SIZES:
            for rank in RANKS:
                lora_A, lora_B = torch.randn(rank, in_f, generator=gen), torch.randn(out_f, rank, generator=gen)
                rows, cols = (in_f, out_f) if fan_in_fan_out else (out_f, in_f)
                weight = torch.randn(rows, cols, generator=gen)
                left, right = (lora_A.T, lora_B.T) if fan_in_fan_out else (lora_B, lora_A)
                ref = _torch_merge(weight, lora_A, lora_B, 0.75, fan_in_fan_out)
                got = _kernel_merge(weight, left, right, 0.75)
                measured += 1
                if native_exact(out_f, in_f, [rank]):
                    exact += 1
                    assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), (out_f, in_f, rank)
    assert exact > measured * 0.7  # the rule keeps the kernel for nearly every shape


def test_ranks_above_the_blocked_inner_dimension_leave_the_kernel():
    """Torch's product splits the rank into blocks above MAX_EXACT_RANK; the rule names that edge."""
    gen = torch.Generator().manual_seed(3)
    for rank in (MAX_EXACT_RANK - 1, MAX_EXACT_RANK):
        A, B, W = torch.randn(rank, 64, generator=gen), torch.randn(64, rank, generator=gen), torch.randn(64, 64,
                                                                                                           generator=gen)
        assert native_exact(64, 64, [rank])
        assert torch.equal(_kernel_merge(W, B, A, 0.5), _torch_merge(W, A, B, 0.5, False)), rank
    assert not native_exact(64, 64, [MAX_EXACT_RANK + 1])
    assert not native_exact(1, 64, [8]) and not native_exact(64, 1, [8])


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
