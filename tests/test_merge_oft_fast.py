"""OFT merged block by block (``surgeon.ops.oft``, ``workflows/merge/oft_fast``) against peft's own
``merge_and_unload()``: bit for bit, over block sizes, block counts, Cayley / Cayley-Neumann, coft,
block_share, biases, base dtypes and several layers; the shapes where the block route does not match
MKL's dense product (and convolutions) must fall back to peft's layer code and still match."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

import surgeon.workflows.merge.oft_fast as oft_fast
from surgeon.cli.main import cli
from surgeon.ops.oft import block_route_exact, dense_rotate, rotate_blocks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Two(nn.Module):
    def __init__(self, features: int, out: int, bias: bool, conv: bool = False) -> None:
        super().__init__()
        self.up = nn.Linear(features, out, bias=bias)
        self.down = nn.Linear(out, features, bias=bias)
        if conv:
            self.conv = nn.Conv2d(features, 4, 3, bias=bias)


@pytest.fixture
def fast_hits(monkeypatch):
    """How often the block route produced the module (a spy: the real function runs)."""
    hits = []
    real = oft_fast.rotate_blocks

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        hits.append(result is not None)
        return result

    monkeypatch.setattr(oft_fast, "rotate_blocks", spy)
    return hits


def _merge_both(tmp_path, *, features, out, dtype, bias=True, conv=False, targets=("up", "down"), **config):
    """(surgeon's merged tensors, peft's merged tensors rounded once to the base dtype)."""
    torch.manual_seed(0)
    base = _Two(features, out, bias, conv).to(DTYPES[dtype])
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base" / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base).float(), peft.OFTConfig(target_modules=list(targets), **config))
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for name, param in model.named_parameters():
                if "oft_R" in name:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.1)
        model.save_pretrained(tmp_path / "adapter")
        reference = {k: v.to(DTYPES[dtype]) for k, v in model.merge_and_unload().state_dict().items()}
    result = CliRunner().invoke(cli, ["-q", "merge", str(tmp_path / "base"), str(tmp_path / "adapter"),
                                      "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    return load_file(str(tmp_path / "merged" / "model.safetensors")), reference


def _assert_same(got, reference):
    assert sorted(got) == sorted(reference)
    for key in got:
        assert got[key].dtype == reference[key].dtype, key
        assert torch.equal(got[key].view(torch.uint8), reference[key].contiguous().view(torch.uint8)), key


@pytest.mark.parametrize("block,features,out", [(4, 64, 48), (8, 64, 48), (16, 128, 40), (32, 128, 96),
                                                (32, 256, 64), (64, 256, 160), (8, 96, 33)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_block_sizes_and_dtypes_match_peft(tmp_path, fast_hits, block, features, out, dtype):
    got, reference = _merge_both(tmp_path, features=features, out=out, dtype=dtype, r=0, oft_block_size=block)
    _assert_same(got, reference)
    assert any(fast_hits), "the block route was never taken"


@pytest.mark.parametrize("config", [
    {"r": 8, "oft_block_size": 0},
    {"r": 0, "oft_block_size": 16, "block_share": True},
    {"r": 0, "oft_block_size": 16, "coft": True},
    {"r": 0, "oft_block_size": 16, "coft": True, "eps": 1e-2},
    {"r": 0, "oft_block_size": 8, "use_cayley_neumann": False},
    {"r": 0, "oft_block_size": 8, "num_cayley_neumann_terms": 1},
    {"r": 0, "oft_block_size": 8, "num_cayley_neumann_terms": 2},
    {"r": 0, "oft_block_size": 8, "num_cayley_neumann_terms": 3},
    {"r": 0, "oft_block_size": 8, "num_cayley_neumann_terms": 8},
    {"r": 0, "oft_block_size": 32, "block_share": True, "coft": True, "use_cayley_neumann": False},
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("bias", [True, False])
def test_oft_variants_match_peft(tmp_path, fast_hits, config, bias):
    got, reference = _merge_both(tmp_path, features=64, out=48, dtype="bf16", bias=bias, **config)
    _assert_same(got, reference)
    assert any(fast_hits), "the block route was never taken"


@pytest.mark.parametrize("block,features,out", [(4, 24, 7), (2, 64, 48)])
def test_shapes_the_rule_refuses_fall_back_to_peft_and_match(tmp_path, fast_hits, block, features, out):
    got, reference = _merge_both(tmp_path, features=features, out=out, dtype="fp32", targets=("up",),
                                 r=0, oft_block_size=block)
    _assert_same(got, reference)
    assert fast_hits == [False]


def test_conv_falls_back_to_peft_and_matches(tmp_path, fast_hits):
    got, reference = _merge_both(tmp_path, features=8, out=12, dtype="fp32", conv=True, targets=("up", "conv"),
                                 r=0, oft_block_size=4)
    _assert_same(got, reference)


@pytest.mark.parametrize("block,features,out", [(2, 64, 48), (2, 256, 64), (256, 2048, 256), (128, 128, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_measured_rule_is_the_dense_products_bits(block, features, out, threads):
    """Every shape the rule accepts gives the dense product's bits on fresh data; a refused shape
    (MKL takes another kernel: 2-wide blocks on small layers, 256-wide blocks on 2048 features) is
    one where they do differ."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(out, features, generator=gen)
    blocks = torch.randn(features // block, block, block, generator=gen)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dense = dense_rotate(weight, blocks)
    finally:
        torch.set_num_threads(saved)
    fast = rotate_blocks(weight, blocks, threads=threads)
    if block_route_exact(out, features, block, threads=threads):
        assert fast is not None and torch.equal(fast, dense)
    else:
        assert fast is None
        rows = weight.view(out, features // block, block).permute(1, 2, 0)
        assert not torch.equal(torch.bmm(blocks, rows).reshape(features, out).t(), dense)


def test_exact_zeros_and_non_finite_weights_take_the_dense_product():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 32, generator=gen)
    blocks = torch.randn(4, 8, 8, generator=gen)
    assert block_route_exact(16, 32, 8, threads=1)
    assert rotate_blocks(weight, blocks, threads=1) is not None
    zero_row = weight.clone()
    zero_row[3] = 0.0  # the sign of an exact zero depends on the zero terms the block product skips
    assert rotate_blocks(zero_row, blocks, threads=1) is None
    inf = weight.clone()
    inf[2, 5] = float("inf")  # the dense product spreads inf * 0 = nan over the row
    assert rotate_blocks(inf, blocks, threads=1) is None


@pytest.mark.parametrize("size,count,coft,eps,share,neumann,terms", [
    (4, 6, False, 6e-5, False, True, 5), (8, 3, True, 6e-5, False, True, 5), (8, 3, True, 1e-1, False, True, 5),
    (16, 4, False, 6e-5, True, True, 5), (8, 2, False, 6e-5, False, False, 5), (32, 2, True, 1e-2, True, False, 5),
    (8, 3, False, 6e-5, False, True, 1), (8, 3, False, 6e-5, False, True, 2), (8, 3, False, 6e-5, False, True, 3),
    (8, 3, False, 6e-5, False, True, 4), (8, 3, False, 6e-5, False, True, 9)])
def test_rotation_blocks_are_peft_rotation_modules_blocks(size, count, coft, eps, share, neumann, terms):
    from peft.tuners.oft.layer import OFTRotationModule

    from surgeon.ops.oft import rotation_blocks

    gen = torch.Generator().manual_seed(size + count)
    saved = torch.randn(1 if share else count, size * (size - 1) // 2, generator=gen) * 0.3
    module = OFTRotationModule(saved.shape[0], saved.shape[1], size, size * count, coft=coft, eps=eps,
                               block_share=share, use_cayley_neumann=neumann, num_cayley_neumann_terms=terms)
    with torch.no_grad():
        module.weight.copy_(saved)
        dense = module.get_weight()
    blocks = rotation_blocks(saved, size, coft=coft, eps=eps, neumann=neumann, terms=terms)
    blocks = blocks.expand(count, size, size) if share else blocks
    assert torch.equal(torch.block_diag(*blocks), dense)
