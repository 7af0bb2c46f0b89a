"""The one `--device` parser every workflow uses, and the CPU BLAS choice that comes with a CPU device."""

from __future__ import annotations

import ctypes
import functools
import os
from typing import TYPE_CHECKING

from surgeon.errors import DeviceError

if TYPE_CHECKING:
    import torch

# Device nodes of a GPU torch could use (NVIDIA, AMD ROCm, WSL): with none, 'auto' is the CPU without asking torch.
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def device_name(name: str | torch.device | None) -> str:
    """:func:`pick_device` as a string, without importing torch (~2 s) where the answer is plainly the CPU:
    'cpu', or 'auto' on a machine with no GPU device node."""
    text = "auto" if name is None else str(name).lower()
    if text == "cpu" or (text == "auto" and not any(os.path.exists(p) for p in _GPU_NODES)):
        return "cpu"
    return str(pick_device(name))


def pick_device(name: str | torch.device | None) -> torch.device:
    """'auto' (or None) -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    import torch

    text = "auto" if name is None else str(name).lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name!r} is not a device surgeon computes on; use auto, cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {name!r} is not a device surgeon computes on; use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA device is available to torch here; use --device cpu (or auto).")
    if device.type == "cpu":
        configure_cpu_blas()
    return device


@functools.lru_cache(maxsize=1)
def configure_cpu_blas() -> bool:
    """Thin CPU products through numpy's OpenBLAS (:mod:`surgeon.ops.blas`) where torch's BLAS is MKL and the
    processor is not Intel's (MKL runs them 3-4x slower there); ``SURGEON_NUMPY_BLAS=0`` never, ``=1`` always.
    Decided from the installation and the processor only, once per process. Returns whether it is on."""
    import numpy as np
    import torch

    from surgeon.ops import blas

    choice = os.environ.get("SURGEON_NUMPY_BLAS", "").strip()
    if choice == "0":
        blas.use_numpy_blas(None)
        return False
    try:
        numpy_blas = str(np.__config__.CONFIG["Build Dependencies"]["blas"]["name"]).lower()  # type: ignore[attr-defined]
    except (AttributeError, KeyError, TypeError):
        numpy_blas = ""
    if choice != "1" and ("openblas" not in numpy_blas or not torch.backends.mkl.is_available() or _intel_cpu()):
        blas.use_numpy_blas(None)
        return False
    blas.use_numpy_blas(_openblas_thread_setter() or True)
    return True


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """glibc's malloc, from here on in this process: every buffer from the one main heap, none mapped on its own,
    and freed memory kept for the next buffer instead of handed back to the kernel. The spectral stream
    allocates and frees ~0.4 GB of float64 matrices per 2048 x 5632 target; as fresh mappings each one is
    faulted in and zeroed page by page (on the 2-core AMD EPYC: 18.9 s of a warm 154-matrix `intruders`
    run's 54 s went to the kernel; kept: 4.3 s, and 48 s in all). The peak RSS is unchanged (the memory is
    reused, not added); the process holds it until it exits. ``SURGEON_MALLOC=0``: left as it is; not glibc:
    nothing to do. Returns whether it took effect."""
    if os.environ.get("SURGEON_MALLOC", "").strip() == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or getattr(libc, "gnu_get_libc_version", None) is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    # one arena first: a thread's own arena could not hold a buffer over 64 MB without a mapping
    return all(mallopt(option, value) == 1 for option, value in
               ((m_arena_max, 1), (m_trim_threshold, 2**31 - 1), (m_mmap_max, 0)))


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return True  # unknown: leave torch's BLAS alone


def _openblas_thread_setter() -> object | None:
    """OpenBLAS's set-num-threads in the library numpy's wheel carries (its symbol names vary by build)."""
    from surgeon.ops.lapack import numpy_openblas

    lib = numpy_openblas()
    if lib is None:
        return None
    for symbol in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                   "openblas_set_num_threads64_", "openblas_set_num_threads"):
        setter = getattr(lib, symbol, None)
        if setter is not None:
            setter.argtypes = [ctypes.c_int]
            return setter
    return None
