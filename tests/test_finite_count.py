"""ops.finite.non_finite_count: NaN, +Inf and -Inf counted in every float dtype and layout, against torch."""

from __future__ import annotations

import pytest
import torch

from surgeon.ops import finite
from surgeon.ops.finite import non_finite_count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_counts_match_torch(dtype, monkeypatch):
    monkeypatch.setattr(finite, "_CHUNK", 1000)  # several chunks, one of them clean
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 17, generator=gen).to(dtype)
    x[3, 2], x[9, 1], x[10, 0], x[299, 16] = float("nan"), float("inf"), float("-inf"), float("nan")
    x[100, 5] = torch.finfo(dtype).max  # the largest finite value is finite
    x[101, 5] = -torch.finfo(dtype).tiny / 2 if dtype != torch.bfloat16 else -1e-40  # a subnormal is finite
    for view in (x, x.T, x[:, ::3], x[50:60]):
        assert non_finite_count(view) == int((~torch.isfinite(view)).sum())
    assert non_finite_count(torch.zeros(0, dtype=dtype)) == 0
    assert non_finite_count(torch.ones(5, 5, dtype=dtype)) == 0


def test_integers_have_none():
    assert non_finite_count(torch.arange(10)) == 0
