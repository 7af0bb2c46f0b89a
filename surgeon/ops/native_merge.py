"""The streamed CPU merge of LoRA deltas in one fused native pass, without torch.

Starting torch costs ~2 s, more than the rest of merging a 1B-parameter checkpoint, and a
dozen torch (or numpy) passes per block cost more than the arithmetic. So the common merge,
LoRA-family deltas into a bf16/fp16/fp32 base on the CPU, runs through a small C kernel
(``native/merge_rows.c``): per row, each product element is a chain of fused multiply-adds over
the rank (the order of torch's CPU BLAS for these shapes), scaled, added to W widened to
float32, rounded once to the output dtype and measured, all while in registers.

The kernel is compiled at first use with the system C compiler into the user's cache
(``$XDG_CACHE_HOME/surgeon/native``, keyed by source, flags and CPU) and loaded with ctypes,
which releases the GIL during the call. With no compiler :func:`kernel` returns None and callers
use the torch path, which gives the same bits (so does ``SURGEON_NATIVE=0``, read by the merge).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy

SOURCE = Path(__file__).with_name("native") / "merge_rows.c"
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")


def _flags(march: str) -> tuple[str, ...]:
    """The compiler flags: FLAGS and ``-march`` (native unless a caller asks for another CPU: the tests build
    for AVX2 and for plain x86-64 to check those code paths on a machine that would pick AVX-512)."""
    return (*FLAGS, f"-march={march}")


DTYPE_CODES = {"F32": 0, "F16": 1, "BF16": 2}  # the kernel's enum
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
CHUNK = 1 << 17  # elements per block of whole rows, for every merge route (2 threads: measured best of 64K-1M)
TILE = 64  # the kernel's columns per tile
MIN_ROWS = 4  # a GEMM of fewer rows may take another kernel (other bits); see tests/test_merge_stream.py

T, R = TypeVar("T"), TypeVar("R")
_lock = threading.Lock()
_default: list[KernelLoad] = []  # the default build, loaded once per process (a loaded library cannot be unloaded)


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


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "surgeon" / "native"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _trusted(path: Path) -> bool:
    """Ours alone: owned by this user and writable by no one else (a shared /tmp could hold a planted file)."""
    try:
        info = path.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _loadable(target: Path) -> bool:
    return target.exists() and _trusted(target) and _trusted(target.parent)


def _build(target: Path, march: str, source: Path = SOURCE, extra: tuple[str, ...] = ()) -> str:
    """Compile ``source`` (this module's kernel unless told) into ``target`` for CPU ``march`` with FLAGS and
    ``extra`` (later flags win); the reason when it could not be ("" when built). Also builds the other native
    kernels (:func:`load_library`)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return "no C compiler"
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _trusted(target.parent):
            return f"{target.parent} is not this user's alone; not building there"
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as exc:  # e.g. a read-only home
        return f"cannot write {target.parent}: {exc}"
    try:
        done = subprocess.run([compiler, *_flags(march), *extra, "-o", tmp, str(source)], capture_output=True,
                              timeout=120, check=False)
        if done.returncode != 0:
            return done.stderr.decode(errors="replace")[-2000:] or f"{compiler} failed"
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: another process may be building the same kernel
        return ""
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc) or type(exc).__name__
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(frozen=True)
class KernelLoad:
    """The outcome of loading the kernel: ``lib`` (None when it could not be) and why not (``error``)."""

    lib: ctypes.CDLL | None
    error: str = ""


def build_key(march: str = "native") -> str:
    """The kernel build's identity: its source, flags and this CPU's flags (the name of the built file)."""
    return _key(SOURCE, march, ())


def _key(source: Path, march: str, extra: tuple[str, ...]) -> str:
    return hashlib.sha256(source.read_bytes() + repr((*_flags(march), *extra)).encode()
                          + _cpu_flags().encode()).hexdigest()[:20]


def private_path(path: Path) -> bool:
    """Whether this user alone owns and may write ``path`` (what the kernel and its memo are read from)."""
    return _trusted(path)


def cache_dir() -> Path:
    """Where the kernel is built (and measurements about this machine are memoised)."""
    return _cache_dir()


def _open(source: Path, march: str, extra: tuple[str, ...], cache_dir: Path | None = None,
          tmp_dir: Path | None = None) -> KernelLoad:
    """``source`` built for CPU ``march`` (FLAGS + ``extra``) and loaded: a trusted copy from ``cache_dir`` (default:
    the user's cache) or ``tmp_dir`` (default: the system's temporary folder), else built into the first of them
    that takes it. Never raises; a failure comes back as ``error``."""
    if sys.platform == "win32":
        return KernelLoad(None, "the native kernel is built on Linux and macOS only")
    key = _key(source, march, extra)
    places = [cache_dir or _cache_dir(), (tmp_dir or Path(tempfile.gettempdir())) / f"surgeon-native-{os.getuid()}"]
    targets = [p / f"{source.stem}-{key}.so" for p in places]
    target = next((t for t in targets if _loadable(t)), None)
    errors = []
    for candidate in targets if target is None else ():
        error = _build(candidate, march, source, extra)
        if not error:
            target = candidate
            break
        errors.append(error)
    if target is None:
        return KernelLoad(None, errors[0] if errors else "no place to build the kernel")
    try:
        return KernelLoad(ctypes.CDLL(str(target)))
    except OSError as exc:
        return KernelLoad(None, str(exc))


def load_kernel(*, march: str = "native", cache_dir: Path | None = None, tmp_dir: Path | None = None) -> KernelLoad:
    """Build (unless a trusted copy exists) and load the kernel for CPU ``march``, looking in ``cache_dir``
    (default: the user's cache) and then ``tmp_dir`` (default: the system's temporary folder). Not cached:
    :func:`kernel` is the process-wide default. Never raises; a failure comes back as ``error``."""
    loaded = _open(SOURCE, march, (), cache_dir, tmp_dir)
    lib = loaded.lib
    if lib is None:
        return loaded
    lib.merge_rows.restype = None
    lib.merge_rows.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t,
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
    ]
    return loaded


def load_library(source: Path, extra: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """Another native kernel (``source``, compiled with FLAGS + ``extra`` for this CPU), from the same trusted
    places as this module's (built there on first use); None where it cannot be built or loaded. The caller
    declares the functions' argument types."""
    return _open(source, "native", extra).lib


def once_per_process(load: Callable[[], ctypes.CDLL | None]) -> Callable[[], ctypes.CDLL | None]:
    """``load`` run at the first call only (under a lock), its library (or None) returned from then on; None
    with ``SURGEON_NATIVE=0``, read at every call. What the other kernels' modules expose as ``kernel()``."""
    lock = threading.Lock()
    loaded: list[ctypes.CDLL | None] = []

    def kernel() -> ctypes.CDLL | None:
        if os.environ.get("SURGEON_NATIVE", "1") == "0":
            return None
        with lock:
            if not loaded:
                loaded.append(load())
            return loaded[0]

    return kernel


def _default_load() -> KernelLoad:
    with _lock:
        if not _default:
            _default.append(load_kernel())
        return _default[0]


def kernel() -> ctypes.CDLL | None:
    """The kernel for this CPU, built on first use and loaded once per process; None where it cannot be (no C
    compiler, a failed build, not Linux/macOS). Whether to use it is the caller's choice (the merge reads
    ``SURGEON_NATIVE`` in one place, ``surgeon.workflows.merge.routes``)."""
    return _default_load().lib


def build_error() -> str:
    """Why :func:`kernel` gave None (empty when it did not)."""
    return _default_load().error


@dataclass(frozen=True)
class LoraFactors:
    """ΔW = scale · left · right in the base's storage layout: ``left`` (rows × r), ``right`` (r × cols),
    both C-contiguous float32. For a Linear weight left = B, right = A; for a Conv1D (fan_in_fan_out)
    weight, stored transposed, left = Aᵀ and right = Bᵀ (the same products, element by element)."""

    left: numpy.ndarray
    right: numpy.ndarray
    scale: float

    @property
    def packed(self) -> numpy.ndarray:
        """``right``'s full tiles of TILE columns, each (r × TILE) contiguous: what the kernel streams."""
        r, cols = self.right.shape
        full = cols - cols % TILE
        return numpy.ascontiguousarray(self.right[:, :full].reshape(r, full // TILE, TILE).transpose(1, 0, 2))

    @classmethod
    def of(cls, lora_A: numpy.ndarray, lora_B: numpy.ndarray, scaling: float, *, fan_in_fan_out: bool = False
           ) -> LoraFactors:
        left, right = (lora_A.T, lora_B.T) if fan_in_fan_out else (lora_B, lora_A)
        return cls(numpy.ascontiguousarray(left, numpy.float32), numpy.ascontiguousarray(right, numpy.float32),
                   float(scaling))


def row_spans(shape: Sequence[int], chunk: int = CHUNK) -> tuple[int, list[tuple[int, int]]]:
    """(columns, [(first row, rows)]) blocks of whole rows, each of about ``chunk`` elements and at least
    ``MIN_ROWS`` rows (a short last block is folded into the one before)."""
    numel = math.prod(shape)
    cols = shape[-1] if len(shape) > 1 and numel else max(1, numel)
    rows = numel // cols if numel else 0
    per = max(MIN_ROWS, chunk // cols)
    spans = [(r, min(per, rows - r)) for r in range(0, rows, per)]
    if len(spans) > 1 and spans[-1][1] < MIN_ROWS:
        (a, n), (_, m) = spans[-2], spans.pop()
        spans[-1] = (a, n + m)
    return cols, spans


def run_interleaved(run: Callable[[list[T]], R], spans: list[T], workers: int,
                    pool: ThreadPoolExecutor | None = None) -> list[R]:
    """``run`` on ``workers`` interleaved shares of ``spans`` (block k to thread k mod workers, so that the
    threads walk a tensor front to back together), on ``pool`` if given; the results of each share."""
    if workers <= 1 or len(spans) <= 1:
        return [run(spans)]
    groups = [spans[k::workers] for k in range(workers)]
    if pool is None:
        with ThreadPoolExecutor(workers) as own:
            return list(own.map(run, groups))
    return list(pool.map(run, groups))


def stream_lora_merge(
    lib: ctypes.CDLL, shape: Sequence[int], stored_dtype: str, out_dtype: str, factors: Sequence[LoraFactors], *,
    read: Callable[[int, int, memoryview], memoryview], write: Callable[[int, memoryview], None],
    workers: int = 1, chunk: int = CHUNK, pool: ThreadPoolExecutor | None = None,
) -> RoundingStats:
    """Merge one 2-D tensor block by block: ``read(start, nbytes, buf)`` fills and returns the stored bytes
    [start, start+nbytes) of W (``buf``: a writable buffer of at least that size), the kernel adds each
    LoRA delta in order and rounds once, and ``write(start, data)`` receives the output bytes at byte offset
    ``start`` of the output tensor while they are still in cache. ``workers`` threads share the blocks."""
    cols, spans = row_spans(shape, chunk)
    in_size, out_size = ITEMSIZE[stored_dtype], ITEMSIZE[out_dtype]
    nd = len(factors)
    for f in factors:
        if f.right.shape[1] != cols or f.left.shape[1] != f.right.shape[0]:
            raise ValueError(f"LoRA factors {f.left.shape} x {f.right.shape} do not fit a weight of shape {tuple(shape)}")
    packed = [f.packed for f in factors]
    rights = (ctypes.c_void_p * nd)(*(f.right.ctypes.data for f in factors))
    tiles = (ctypes.c_void_p * nd)(*(p.ctypes.data for p in packed))
    strides = (ctypes.c_size_t * nd)(*(f.left.shape[1] for f in factors))
    ranks = (ctypes.c_int * nd)(*(f.right.shape[0] for f in factors))
    scales = (ctypes.c_float * nd)(*(f.scale for f in factors))
    codes = DTYPE_CODES[stored_dtype], DTYPE_CODES[out_dtype]

    def run(part: list[tuple[int, int]]) -> tuple[float, float, int, int]:
        most = max((n for _, n in part), default=0) * cols
        src, dst = numpy.empty(most * in_size, numpy.uint8), numpy.empty(most * out_size, numpy.uint8)
        src_view, dst_view = memoryview(src), memoryview(dst)
        stats, counts = numpy.zeros(2, numpy.float64), numpy.zeros(2, numpy.int64)
        lefts = (ctypes.c_void_p * nd)()
        for row, n in part:
            data = read(row * cols * in_size, n * cols * in_size, src_view)
            if data.obj is not src:  # the reader handed back its own memory: copy it where the kernel reads
                src_view[: len(data)] = data
            for q, f in enumerate(factors):
                lefts[q] = f.left.ctypes.data + row * f.left.strides[0]
            lib.merge_rows(src.ctypes.data, codes[0], dst.ctypes.data, codes[1], n, cols, nd, lefts, strides, rights, tiles,
                           ranks, scales, stats.ctypes.data, counts.ctypes.data)
            write(row * cols * out_size, dst_view[: n * cols * out_size])
        return float(stats[0]), float(stats[1]), int(counts[0]), int(counts[1])

    parts = run_interleaved(run, spans, workers, pool)
    delta_sq, lost_sq, changed, bad = (sum(p[j] for p in parts) for j in range(4))
    return RoundingStats(numel=math.prod(shape), delta_norm=math.sqrt(delta_sq), lost_norm=math.sqrt(lost_sq),
                         changed=changed, nonfinite=bad)
