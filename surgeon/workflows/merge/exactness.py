"""Which streamed route may merge a LoRA target with peft's bits, decided by measurement on this machine.

peft computes a LoRA delta as one whole torch GEMM; whether surgeon's native kernel (an FMA chain per
element) or its torch stream (one GEMM per block of rows) reproduces those bits depends on the BLAS, the
CPU, the shape and torch's thread count (``surgeon.ops.blas_agreement`` explains and measures it). Each
(shape, rank, layout, block partition) is measured once, on random factors, when a merge first meets it;
the answer is memoised in the kernel's cache folder under a key of everything it depends on (the kernel
build and CPU, the torch build, the thread settings), so later merges read it without starting torch. A
target no streamed route reproduces is merged whole in memory, by peft's own arithmetic.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Iterable
from typing import Any

from surgeon.io.probe_cache import ProbeMemo
from surgeon.ops import native_merge

MEMO_KIND = "blas-agreement-v1"


def _torch_build() -> str:
    torch = sys.modules.get("torch")
    if torch is not None:
        return f"{torch.__version__}/threads={torch.get_num_threads()}"
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        return ""


def machine_key() -> str:
    """Everything a measured answer depends on besides the shape: the kernel build (its source, flags and the
    CPU's flags), the CPU, the torch build and its thread settings (torch's count once it is loaded; before,
    what sets it: the OpenMP/MKL variables and the cores this process may use)."""
    import hashlib

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    parts = (native_merge.build_key(), _cpu_name(), _torch_build(), os.environ.get("OMP_NUM_THREADS", ""),
             os.environ.get("MKL_NUM_THREADS", ""), str(cores))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


class Exactness:
    """Measured answers for one merge: :meth:`native` and :meth:`blocks` (memoised per machine key)."""

    def __init__(self, lib: Any, *, chunk: int, workers: int) -> None:
        self.lib, self.chunk, self.workers = lib, chunk, workers
        self._memo: ProbeMemo | None = None  # read at the first question: a GPU or LoRA-free merge never asks
        self.measured = 0  # probes run by this merge (not read from the memo)

    @property
    def memo(self) -> ProbeMemo:
        if self._memo is None:
            self._memo = ProbeMemo(native_merge.cache_dir(), MEMO_KIND, machine_key(), native_merge.private_path)
        return self._memo

    def _answer(self, route: str, rows: int, cols: int, rank: int, fan_in_fan_out: bool) -> bool:
        name = f"{route}:{rows}x{cols}:r{rank}:{'T' if fan_in_fan_out else 'N'}:c{self.chunk}:w{self.workers}"
        if name not in self.memo.answers:
            from surgeon.ops import blas_agreement

            if route == "native":
                answer = blas_agreement.native_agrees(self.lib, rows, cols, rank, fan_in_fan_out=fan_in_fan_out,
                                                      chunk=self.chunk, workers=self.workers)
            else:
                answer = blas_agreement.blocks_agree(rows, cols, rank, fan_in_fan_out=fan_in_fan_out,
                                                     chunk=self.chunk, workers=self.workers)
            self.measured += 1
            self.memo.record(name, answer)
        return self.memo.answers[name]

    def native(self, rows: int, cols: int, ranks: Iterable[int], *, fan_in_fan_out: bool) -> bool:
        """Whether the native kernel gives peft's bits for LoRAs of these ranks on a (rows × cols) weight."""
        return all(self._answer("native", rows, cols, r, fan_in_fan_out) for r in ranks)

    def blocks(self, rows: int, cols: int, ranks: Iterable[int], *, fan_in_fan_out: bool) -> bool:
        """Whether the torch stream's row-block products give peft's bits for LoRAs of these ranks."""
        return all(self._answer("blocks", rows, cols, r, fan_in_fan_out) for r in ranks)
