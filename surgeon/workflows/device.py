"""The one `--device` parser every workflow uses."""

from __future__ import annotations

import torch

from surgeon.errors import SurgeonError


def pick_device(name: str | torch.device | None) -> torch.device:
    """'auto' (or None) -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    text = "auto" if name is None else str(name).lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise SurgeonError(f"--device {name!r} is not a device surgeon computes on; use auto, cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise SurgeonError(f"--device {name!r} is not a device surgeon computes on; use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SurgeonError(f"--device {name}: no CUDA device is available to torch here; use --device cpu (or auto).")
    return device
