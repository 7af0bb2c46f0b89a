"""The one `--device` parser every workflow uses."""

from __future__ import annotations

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
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name!r} is not a device surgeon computes on; use auto, cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {name!r} is not a device surgeon computes on; use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA device is available to torch here; use --device cpu (or auto).")
    return device
