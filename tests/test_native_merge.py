"""The native merge kernel (surgeon/ops/native/merge_rows.c) against torch: for every dtype pair, rank,
layout and block size, its output must have the same bits as torch's whole-tensor merge
round(W.float() + s·B·A) (peft's arithmetic), and the same statistics. Also: a CPU LoRA merge runs
without importing torch at all, and with the kernel switched off it still gives the same files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy
import peft
import pytest
import torch

from _merge_helpers import cast_base, make_adapter, peft_merged, read_folder
from surgeon.ops import native_merge
from surgeon.ops.blas_agreement import native_agrees
from surgeon.ops.lora import lora_delta
from surgeon.ops.merge_rounding import round_merged

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}

pytestmark = pytest.mark.skipif(native_merge.kernel() is None,
                                reason=f"the native kernel cannot be built here: {native_merge.build_error()}")


def _native(stored: torch.Tensor, out_dtype: str, factors: list, *, chunk: int, workers: int, lib=None):
    raw = stored.contiguous().view(torch.uint8).numpy().reshape(-1)
    out = bytearray(stored.numel() * DTYPES[out_dtype].itemsize)
    written = numpy.zeros(len(out), bool)

    def read(start, nbytes, buf):
        buf[:nbytes] = raw[start : start + nbytes].tobytes()  # through the byte buffer, as from a file
        return buf[:nbytes]

    def write(start, data):
        assert not written[start : start + len(data)].any(), "a block was written twice"
        out[start : start + len(data)] = data
        written[start : start + len(data)] = True

    stored_dtype = next(k for k, v in DTYPES.items() if v == stored.dtype)
    stats = native_merge.stream_lora_merge(lib or native_merge.kernel(), stored.shape, stored_dtype, out_dtype, factors,
                                           read=read, write=write, workers=workers, chunk=chunk)
    assert written.all(), "a block was never written"
    return torch.frombuffer(out, dtype=DTYPES[out_dtype]).view(stored.shape), stats


CASES = [  # rows, cols, rank, fan_in_fan_out: tails narrower than a 64-column tile, ranks 1-128, Conv1D layout
    (64, 48, 8, False), (37, 29, 3, True), (130, 70, 16, False), (9, 1000, 33, True), (5, 5, 1, False),
    (64, 2048, 16, False), (300, 200, 64, True), (1000, 4, 32, False), (4, 1000, 33, False), (200, 130, 128, False),
]


@pytest.mark.parametrize("rows,cols,rank,fan_in_fan_out", CASES)
@pytest.mark.parametrize("adapters", [1, 2])
def test_kernel_equals_torch_bit_for_bit(rows, cols, rank, fan_in_fan_out, adapters):
    _check_case(rows, cols, rank, fan_in_fan_out, adapters)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 code paths")
@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_avx2_and_plain_c_paths_equal_torch(march, tmp_path):
    """The kernel as built for a CPU without AVX-512 (AVX2 + FMA: 8-wide accumulators, one row at a time)
    and for baseline x86-64 (plain C, fmaf): the same bits."""
    loaded = native_merge.load_kernel(march=march, cache_dir=tmp_path / "cache", tmp_dir=tmp_path / "tmp")
    if loaded.lib is None:
        pytest.skip(f"cannot build for {march}: {loaded.error}")
    for case in CASES[::2]:
        _check_case(*case, 1 + case[2] % 2, lib=loaded.lib)


def _check_case(rows: int, cols: int, rank: int, fan_in_fan_out: bool, adapters: int, lib=None) -> None:
    """Wherever the measurement (surgeon.ops.blas_agreement, on this machine) says the kernel gives torch's
    bits for this shape and block partition, it does on this test's own data, for every dtype pair, with the
    same statistics; where it says not, the float32 result does differ (and only by the order of additions)."""
    lib = lib or native_merge.kernel()
    gen = torch.Generator().manual_seed(rows * cols + rank)
    for stored_dtype in DTYPES:
        for out_dtype in DTYPES:
            weight = torch.randn(rows, cols, generator=gen) * 0.05
            weight[0, 0], weight[1, 1], weight[2, 2] = 3e4, -0.0, 1e-6  # large (fp16 edge), signed zero, tiny
            weight = weight.to(DTYPES[stored_dtype])
            deltas, factors = [], []
            for q in range(adapters):
                in_f, out_f = (rows, cols) if fan_in_fan_out else (cols, rows)
                A, B = torch.randn(rank, in_f, generator=gen) * 0.1, torch.randn(out_f, rank, generator=gen) * 0.1
                deltas.append(lora_delta(A, B, 0.7 + q, fan_in_fan_out=fan_in_fan_out))
                factors.append(native_merge.LoraFactors.of(A.numpy(), B.numpy(), 0.7 + q, fan_in_fan_out=fan_in_fan_out))
            ref, ref_stats = round_merged(weight, DTYPES[out_dtype], deltas=deltas)
            for chunk, workers in ((1, 2), (cols * 7, 1), (10**6, 2)):
                got, stats = _native(weight, out_dtype, factors, chunk=chunk, workers=workers, lib=lib)
                case = (stored_dtype, out_dtype, chunk, workers)
                exact = native_agrees(lib, rows, cols, rank, fan_in_fan_out=fan_in_fan_out, chunk=chunk, workers=workers)
                same = torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
                if not exact:  # the merge routes this shape to torch; the kernel is another order of additions
                    if (stored_dtype, out_dtype) == ("F32", "F32"):
                        assert not same, case
                        bound = 4 * rank * adapters * torch.finfo(torch.float32).eps * float(ref.abs().max())
                        assert float((got - ref).abs().max()) <= bound, case
                    continue
                assert same, case
                assert (stats.changed, stats.nonfinite, stats.numel) == (ref_stats.changed, 0, rows * cols), case
                # float32 sums of squares per block of up to 131072 elements (the BLAS's dot): ~sqrt(n)·eps apart
                assert stats.delta_norm == pytest.approx(ref_stats.delta_norm, rel=1e-4), case
                assert stats.lost_norm == pytest.approx(ref_stats.lost_norm, rel=1e-4, abs=1e-30), case


def test_zero_b_keeps_signed_zeros_as_torch():
    """An untrained LoRA (B = 0) adds +0 in torch: a -0.0 in the base becomes +0.0 (a changed element).
    The kernel's chain starts from +0 as the BLAS does, so it agrees bit for bit and in the count."""
    weight = torch.zeros(8, 80)
    weight[::2] = -0.0
    A, B = -torch.rand(4, 80) - 0.1, torch.zeros(8, 4)
    ref, ref_stats = round_merged(weight, torch.float32, deltas=[lora_delta(A, B, 2.0)])
    got, stats = _native(weight, "F32", [native_merge.LoraFactors.of(A.numpy(), B.numpy(), 2.0)], chunk=1, workers=1)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
    assert stats.changed == ref_stats.changed == 4 * 80


def test_kernel_counts_non_finite_outputs():
    weight = torch.zeros(16, 8, dtype=torch.float16)
    A, B = torch.zeros(1, 8), torch.zeros(16, 1)
    A[0, 2], B[3, 0], B[11, 0] = 1.0, 1e6, float("nan")  # overflows fp16; NaN spreads over row 11
    _, stats = _native(weight, "F16", [native_merge.LoraFactors.of(A.numpy(), B.numpy(), 1.0)], chunk=32, workers=2)
    assert stats.nonfinite == 1 + 8


def test_cpu_lora_merge_does_not_import_torch(tiny_llama, tmp_path):
    """The whole `surgeon merge` of a LoRA on the CPU runs without torch (~2 s of start-up saved) once this
    machine's BLAS has been measured for the adapter's shapes: the first merge measures (with torch) and
    remembers, the second reads the answers. Both outputs equal peft's merge."""
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    code = ("import sys, json; from surgeon.cli.main import main; sys.argv = ['surgeon', 'merge', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print(json.dumps({'rc': e.code, 'torch': 'torch' in sys.modules}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    reference = peft_merged(tiny_llama, [(adapter, 1.0)])
    for run in ("first", "second"):
        out = tmp_path / f"merged-{run}"
        done = subprocess.run([sys.executable, "-c", code, str(tiny_llama), str(adapter), "-o", str(out), "--json"],
                              capture_output=True, text=True, env=env, check=False)
        lines = done.stdout.strip().splitlines()
        result, report = json.loads(lines[-1]), json.loads("\n".join(lines[:-1]))
        measured = [n for n in report["notes"] if n.startswith("measured on this machine")]
        if run == "first":
            assert result["rc"] == 0 and measured, done.stderr[-2000:]
        else:
            assert result == {"rc": 0, "torch": False} and not measured, done.stderr[-2000:]
        got = read_folder(out)
        assert sorted(got) == sorted(reference)
        for name, tensor in got.items():
            assert torch.equal(tensor, reference[name]), name


def test_kernel_switched_off_gives_the_same_files(tiny_llama, tmp_path):
    """SURGEON_NATIVE=0 (as on a machine without a C compiler) takes the torch streamer: same bytes."""
    base = cast_base(tiny_llama, tmp_path / "bf16", torch.bfloat16)
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", peft.LoraConfig(r=8, target_modules=["q_proj", "up_proj"]))
    outputs = []
    for flag in ("1", "0"):
        out = tmp_path / f"merged-{flag}"
        env = {**os.environ, "SURGEON_NATIVE": flag, "PYTHONPATH": os.pathsep.join(sys.path)}
        subprocess.run([sys.executable, "-m", "surgeon", "-q", "merge", str(base), str(adapter), "-o", str(out)],
                       check=True, env=env, capture_output=True)
        outputs.append(read_folder(out))
    assert sorted(outputs[0]) == sorted(outputs[1])
    for name in outputs[0]:
        assert torch.equal(outputs[0][name].view(torch.uint8), outputs[1][name].view(torch.uint8)), name


def test_kernel_is_built_into_the_users_cache_and_never_loaded_from_a_shared_place(tmp_path):
    """First use builds into the user's cache; a copy there that others may write is not
    loaded (a shared directory could hold a planted library), nor built over."""
    cache, tmp = tmp_path / "cache" / "surgeon" / "native", tmp_path / "tmp"
    assert native_merge.load_kernel(cache_dir=cache, tmp_dir=tmp).lib is not None
    built = list(cache.glob("merge_rows-*.so"))
    assert len(built) == 1
    cache.chmod(0o777)
    tmp.mkdir(mode=0o777)
    tmp.chmod(0o777)
    (tmp / f"surgeon-native-{os.getuid()}").mkdir()
    (tmp / f"surgeon-native-{os.getuid()}").chmod(0o777)
    refused = native_merge.load_kernel(cache_dir=cache, tmp_dir=tmp)
    assert refused.lib is None
    assert "not this user's alone" in refused.error
