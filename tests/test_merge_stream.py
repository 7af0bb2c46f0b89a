"""The streamed merge path: LoRA deltas computed row block by row block, rounded chunk by chunk and
written with pwrite straight into the output shard. It must give the same bits as whole-tensor math
(and as peft), the same statistics, and a valid file, whatever the block boundaries."""

from __future__ import annotations

import os

import peft
import pytest
import torch

from _merge_helpers import make_adapter, peft_merged, read_folder
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.writer import CheckpointWriter, TensorSpec, pwrite_all
from surgeon.ops.lora import lora_delta, lora_delta_rows
from surgeon.ops import blas_agreement, native_merge
from surgeon.ops.blas_agreement import MIN_ELEMENTS, blocks_agree, native_agrees
from surgeon.ops.merge_rounding import round_merged, stream_merged
from surgeon.workflows.merge import run as merge_mod

SHAPES = [(64, 48), (37, 129), (256, 2048), (2048, 256), (5, 7)]


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("rank", [1, 4, 16, 33])
def test_the_measurement_tells_where_row_blocks_of_the_lora_delta_equal_the_whole(rank, fan_in_fan_out):
    """Whether B·A computed one block of rows at a time equals the whole product depends on the BLAS (MKL on
    an AMD EPYC takes other kernels for short calls): the merge measures it (blas_agreement.blocks_agree)
    and streams only where it holds. The measured answer must hold on other data, for small and large blocks."""
    gen = torch.Generator().manual_seed(rank)
    for rows, cols in SHAPES:
        for chunk in (1, cols * 7, 10**6):
            out_f, in_f = (cols, rows) if fan_in_fan_out else (rows, cols)  # W is (in x out) for Conv1D
            A, B = torch.randn(rank, in_f, generator=gen), torch.randn(out_f, rank, generator=gen)
            whole = lora_delta(A, B, 0.37, fan_in_fan_out=fan_in_fan_out)
            assert whole.shape == (rows, cols)
            fill = lambda i, n, buf: lora_delta_rows(A, B, 0.37, slice(i // cols, (i + n) // cols),
                                                     fan_in_fan_out=fan_in_fan_out, out=buf)
            got, _ = _streamed(torch.zeros(rows, cols), torch.float32, [fill], chunk, 2)
            measured = blocks_agree(rows, cols, rank, fan_in_fan_out=fan_in_fan_out, chunk=chunk, workers=2)
            if rows * cols >= MIN_ELEMENTS:  # enough elements for one draw to show another order of additions
                assert torch.equal(got, whole) == measured, (rows, cols, chunk)
            elif measured:
                assert torch.equal(got, whole), (rows, cols, chunk)
            if chunk == 10**6:  # one block: the whole product itself
                assert measured, (rows, cols)


def test_the_measurement_sees_a_block_one_ulp_off(monkeypatch):
    """The probe is sensitive to a single differing element: a row-block product off by one ulp in one
    place (as another BLAS kernel would be) is measured as not exact."""
    def off_by_one_ulp(lora_A, lora_B, scaling, rows, *, fan_in_fan_out=False, out):
        block = lora_delta_rows(lora_A, lora_B, scaling, rows, fan_in_fan_out=fan_in_fan_out, out=out)
        if rows.start == 8:
            block[3] = torch.nextafter(block[3], torch.tensor(float("inf")))
        return block

    assert blocks_agree(64, 48, 4, fan_in_fan_out=False, chunk=4 * 48, workers=1)
    monkeypatch.setattr(blas_agreement, "lora_delta_rows", off_by_one_ulp)
    assert not blocks_agree(64, 48, 4, fan_in_fan_out=False, chunk=4 * 48, workers=1)


def _streamed(stored: torch.Tensor, out_dtype: torch.dtype, deltas: list, chunk: int, workers: int):
    flat = stored.reshape(-1)
    out = torch.empty(flat.numel(), dtype=out_dtype)
    written = torch.zeros(flat.numel(), dtype=torch.bool)

    def read(i, n, buf):
        raw = buf[: n * flat.element_size()]
        raw.copy_(flat[i : i + n].view(torch.uint8))  # through the byte buffer, as from a file
        return raw.view(flat.dtype)

    def write(i, rounded):
        assert not written[i : i + rounded.numel()].any(), "a chunk was written twice"
        out[i : i + rounded.numel()] = rounded
        written[i : i + rounded.numel()] = True

    stats = stream_merged(stored.shape, stored.dtype, out_dtype, read=read, deltas=deltas, write=write,
                          workers=workers, chunk=chunk)
    assert written.all(), "a chunk was never written"
    return out.view(stored.shape), stats


@pytest.mark.parametrize("stored_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                                    (torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_rounding_equals_whole_tensor_rounding(stored_dtype, out_dtype, workers):
    gen = torch.Generator().manual_seed(5)
    rows, cols, rank = 103, 40, 6
    stored = torch.randn(rows, cols, generator=gen).to(stored_dtype)
    A, B = torch.randn(rank, cols, generator=gen) * 1e-2, torch.randn(rows, rank, generator=gen) * 1e-2
    extra = torch.randn(rows, cols, generator=gen) * 1e-3
    whole = [lora_delta(A, B, 2.0), extra]
    ref, ref_stats = round_merged(stored, out_dtype, deltas=whole)
    flat = whole[0].reshape(-1)  # chunks of the whole product: this test is about rounding and statistics
    blocks = [lambda i, n, buf: buf[:n].copy_(flat[i : i + n]), extra]
    for chunk in (1, cols * 5, cols * 7 + 3, rows * cols, 10**6):  # 103 rows: a short last block is folded in
        got, stats = _streamed(stored, out_dtype, blocks, chunk, workers)
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), chunk
        assert stats.changed == ref_stats.changed and stats.numel == ref_stats.numel
        assert stats.delta_norm == pytest.approx(ref_stats.delta_norm, rel=1e-6)
        assert stats.lost_norm == pytest.approx(ref_stats.lost_norm, rel=1e-6)
    assert 0 < ref_stats.changed <= rows * cols
    if out_dtype != torch.float32:  # rounding swallows part of a small delta
        assert ref_stats.changed < rows * cols and ref_stats.lost_norm > 0


def test_streamed_rounding_counts_non_finite_outputs():
    stored = torch.zeros(16, 8, dtype=torch.float16)
    delta = torch.zeros(16, 8)
    delta[3, 2] = 1e6  # overflows fp16
    delta[11, 0] = float("nan")
    _, stats = _streamed(stored, torch.float16, [delta], 8 * 4, 2)
    assert stats.nonfinite == 2


def test_reserved_tensor_filled_with_pwrite_reads_back(tmp_path):
    specs = [TensorSpec("a", "F32", (3,)), TensorSpec("b", "BF16", (4, 5)), TensorSpec("c", "F32", (2,))]
    b = torch.randn(4, 5).bfloat16()
    with CheckpointWriter(tmp_path / "out", specs, max_shard_size=10**9) as writer:
        writer.write("a", torch.arange(3.0))
        fd, offset = writer.reserve("b")
        raw = memoryview(b.reshape(-1).view(torch.uint8).numpy())
        pwrite_all(fd, raw[20:], offset + 20)  # out of order, as two threads would
        pwrite_all(fd, raw[:20], offset)
        writer.write("c", torch.tensor([7.0, 8.0]))
    with Checkpoint.open(tmp_path / "out") as ckpt:
        assert torch.equal(ckpt.get("a"), torch.arange(3.0))
        assert torch.equal(ckpt.get("b"), b)
        assert torch.equal(ckpt.get("c"), torch.tensor([7.0, 8.0]))


@pytest.fixture(params=["native", "torch"])
def engine(request) -> str:
    """The streamed merge's engine: the native kernel, or (as without a C compiler) the torch streamer."""
    if request.param == "native" and native_merge.kernel() is None:
        pytest.skip(f"the native kernel cannot be built here: {native_merge.build_error()}")
    return request.param


def _streamed_on(report, engine: str, base, rank: int, chunk: int, fan_in_fan_out: bool = False) -> bool:
    """Whether every merged tensor took the route the measurement allows on this machine: the engine's
    streamed route (native kernel, or torch's row blocks) where it gives peft's bits, else the whole product
    in memory (on an AMD EPYC's MKL, short row blocks of a Conv1D product are not exact, so those stay whole)."""
    from surgeon.workflows.merge.routes import cpu_workers

    workers, lib = cpu_workers(), native_merge.kernel()
    with Checkpoint.open(base) as ckpt:
        shapes = {e.name: ckpt.info(e.name).shape for e in report.entries}
    for e in report.entries:
        rows, cols = shapes[e.name]
        if engine == "native" and native_agrees(lib, rows, cols, rank, fan_in_fan_out=fan_in_fan_out, chunk=chunk,
                                                workers=workers):
            expected = "native"
        elif blocks_agree(rows, cols, rank, fan_in_fan_out=fan_in_fan_out, chunk=chunk, workers=workers):
            expected = "stream"
        else:
            expected = "memory"
        if e.route != expected:
            return False
    return bool(report.entries)


@pytest.mark.parametrize("chunk", [1, 300])
def test_merge_with_many_small_blocks_still_equals_peft(tiny_llama, tiny_gpt2, tmp_path, chunk, engine):
    """The peft comparisons elsewhere see one block per tensor (tiny models); here the blocks are 4+ rows,
    so every block boundary of the row-wise B·A is exercised, for Linear and Conv1D layouts."""
    cases = [(tiny_llama, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
             (tiny_gpt2, peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))]
    for k, (base, config) in enumerate(cases):
        adapter = make_adapter(base, tmp_path / f"adapter{k}", config)
        report = merge_mod.merge(base, [(adapter, 0.7)], tmp_path / f"out{k}", engine=engine, chunk=chunk)
        assert _streamed_on(report, engine, base, 4, chunk, k == 1), "not the measured routes"
        reference = peft_merged(base, [(adapter, 0.7)])
        got = read_folder(tmp_path / f"out{k}")
        for name, tensor in got.items():
            assert torch.equal(tensor, reference[name]), name


def test_streamed_merge_leaves_no_holes_in_bf16_output(tiny_llama, tmp_path, engine):
    """bf16 base, several blocks, two threads: every byte of every merged tensor was written
    (a missed block would read back as zeros) and equals round(W + ΔW) from the in-memory path."""
    from _merge_helpers import cast_base

    base = cast_base(tiny_llama, tmp_path / "bf16", torch.bfloat16)
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    report = merge_mod.merge(base, [adapter], tmp_path / "streamed", engine=engine, chunk=200)
    assert _streamed_on(report, engine, base, 4, 200), "not the measured routes"
    whole = merge_mod.merge(base, [adapter], tmp_path / "whole", engine="memory")
    assert {e.route for e in whole.entries} == {"memory"}
    streamed, whole = read_folder(tmp_path / "streamed"), read_folder(tmp_path / "whole")
    assert sorted(streamed) == sorted(whole)
    for name in whole:
        assert torch.equal(streamed[name].view(torch.uint8), whole[name].view(torch.uint8)), name
    assert os.listdir(tmp_path / "streamed")


@pytest.mark.parametrize("layout", ["one-file", "tiny-shards"])
def test_streamed_merge_into_one_file_or_many_shards(tiny_llama, tmp_path, layout, engine):
    """Reserved places land right whether the streamed tensor opens a new shard or shares one file."""
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    out = tmp_path / ("merged.safetensors" if layout == "one-file" else "merged")
    shard = "1KB" if layout == "tiny-shards" else "5GB"
    report = merge_mod.merge(tiny_llama, [adapter], out, max_shard_size=shard, engine=engine, chunk=100)
    assert report.merged > 0 and _streamed_on(report, engine, tiny_llama, 4, 100)
    reference = peft_merged(tiny_llama, [(adapter, 1.0)])
    if layout == "one-file":
        with Checkpoint.open(out) as ckpt:
            got = {n: ckpt.get(n) for n in ckpt.keys()}
    else:
        got = read_folder(out)
        assert len(list(out.glob("*.safetensors"))) > 5
    assert sorted(got) == sorted(reference)
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name]), name
