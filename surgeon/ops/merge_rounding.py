"""One rounding of a float32 merge result to the output dtype, measured.

Works in chunks small enough to stay in cache, so the statistics cost little
more than the cast itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_CHUNK = 1 << 18


@dataclass(frozen=True)
class RoundingStats:
    """What rounding W' = W + ΔW to the output dtype kept of ΔW.

    ``delta_norm`` = ‖ΔW‖ (ΔW = W' − W, float32), ``lost_norm`` = ‖round(W') − W'‖,
    ``changed`` = elements where round(W') differs from W in the output dtype,
    ``delta_nonzero`` = elements where ΔW ≠ 0, ``nonfinite`` = non-finite outputs.
    """

    numel: int
    delta_norm: float
    lost_norm: float
    changed: int
    delta_nonzero: int
    nonfinite: int

    @property
    def lost_fraction(self) -> float:
        """‖round(W') − W'‖ / ‖ΔW‖ (0 when ΔW = 0)."""
        return self.lost_norm / self.delta_norm if self.delta_norm > 0 else 0.0


@torch.no_grad()
def round_merged(merged: torch.Tensor, stored: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, RoundingStats]:
    """Round ``merged`` (float32, any shape) once to ``out_dtype`` and measure it against ``stored``.

    ``stored`` is the base tensor as stored (same shape, any float dtype, same device).
    Returns the rounded tensor (shape of ``merged``, ``out_dtype``, same device) and its stats.
    """
    flat_m = merged.reshape(-1)
    flat_s = stored.reshape(-1)
    out = torch.empty(flat_m.shape, dtype=out_dtype, device=merged.device)
    rounds = out_dtype != torch.float32
    sums = torch.zeros(5, dtype=torch.float64, device=merged.device)  # ‖ΔW‖², ‖err‖², changed, nonzero, nonfinite
    for i in range(0, flat_m.numel(), _CHUNK):
        m = flat_m[i : i + _CHUNK]
        s = flat_s[i : i + _CHUNK]
        o = out[i : i + _CHUNK]
        o.copy_(m)
        d = m - s.float()
        sums[0] += torch.dot(d, d)
        if rounds:
            e = o.float().sub_(m)
            sums[1] += torch.dot(e, e)
        base_out = s if s.dtype == out_dtype else s.to(out_dtype)
        sums[2] += torch.count_nonzero(o != base_out)
        sums[3] += torch.count_nonzero(d)
        sums[4] += o.numel() - torch.count_nonzero(torch.isfinite(o))
    values = sums.tolist()
    stats = RoundingStats(numel=flat_m.numel(), delta_norm=values[0] ** 0.5, lost_norm=values[1] ** 0.5,
                          changed=int(values[2]), delta_nonzero=int(values[3]), nonfinite=int(values[4]))
    return out.reshape(merged.shape), stats
