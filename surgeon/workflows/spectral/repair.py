"""One matrix's repair: which intruders to scale, the edit (λ − 1)·U_IΣ_IV_Iᵀ, the rounded result
(shared by the one-process and the distributed writers of `surgeon scale-intruders`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from surgeon.errors import NumericalError
from surgeon.io.format import torch_dtype
from surgeon.ops import intruders as ops
from surgeon.ops.targets import Target
from surgeon.workflows.spectral.intruders import Analysis, MatrixIntruders


@dataclass(frozen=True)
class IntruderChange:
    """One repaired matrix: the intruder ranks scaled, σ before and after, ‖W' − W_t‖_F."""

    name: str
    ranks: list[int]
    cosines: list[float]
    sigma_before: list[float]
    sigma_after: list[float]
    delta_norm: float
    dtype: str


def chosen_ranks(row: MatrixIntruders, only_top: int | None) -> list[int]:
    return row.intruders[:only_top] if only_top is not None else list(row.intruders)


def matrix_change(a: Analysis, ranks: list[int], lam: float, dtype: str) -> tuple[IntruderChange, torch.Tensor]:
    """The change entry and the edit (λ − 1)·U_IΣ_IV_Iᵀ (float64, nn.Linear orientation)."""
    t = a.triplets
    assert t is not None
    edit = ops.intruder_edit(t.u, t.s, t.v, ranks, lam)
    cos = a.row.cos_left if a.row.cos_left is not None else a.row.cos_right
    before = [a.row.sigma[j - 1] for j in ranks]
    entry = IntruderChange(a.row.name, ranks, [cos[j - 1] for j in ranks] if cos else [], before,
                           [lam * s for s in before], float(edit.norm()), dtype)
    return entry, edit


def tuned_dense(a: Analysis) -> torch.Tensor:
    """W_t (float64, nn.Linear orientation, on the triplets' device)."""
    loaded = a.loaded
    device = a.triplets.u.device if a.triplets is not None else torch.device("cpu")
    if loaded.factors is not None:
        left, right = (f.to(device) for f in loaded.factors)
        return loaded.w0.to(device) + left @ right
    return (loaded.tuned if loaded.tuned is not None else loaded.w0).to(device)


def rounded(w: torch.Tensor, target: Target, dtype: str) -> torch.Tensor:
    out = (w.T if target.transposed else w).to(torch_dtype(dtype)).cpu().contiguous()
    if not bool(torch.isfinite(out).all()):
        raise NumericalError(f"{target.name}: the repaired weights are not finite in {dtype}; lower --lambda.")
    return out


def restricted(stream: Iterator[Analysis], only: Mapping[str, Sequence[int]]) -> Iterator[Analysis]:
    """The stream with each row's intruders narrowed to ``only[name]``."""
    try:
        for a in stream:
            kept = [j for j in a.row.intruders if j in set(only.get(a.row.name, ()))]
            row = replace(a.row, intruders=kept, intruder_sigma=[a.row.sigma[j - 1] for j in kept],
                          energy_share=ops.energy_share(a.row.sigma, kept))
            yield replace(a, row=row)
    finally:
        stream.close()  # type: ignore[attr-defined]
