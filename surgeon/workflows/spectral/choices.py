"""Option values of the spectral commands, torch-free: `surgeon intruders --help` lists them without loading torch."""

from __future__ import annotations

SIDES = ("left", "right", "both")  # singular vectors compared: left (the paper's), right, or both
