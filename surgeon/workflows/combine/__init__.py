"""Combining adapters: peft's add_weighted_adapter (plan, module-by-module run) and convert_to_lora.

``combine_adapters`` (which needs torch) loads on first use, so the plan's names (``COMBINATIONS``,
what `surgeon combine --help` lists) import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from surgeon.workflows.combine.plan import COMBINATIONS, CombineOptions, CombineReport

if TYPE_CHECKING:
    from surgeon.workflows.combine.run import combine_adapters

__all__ = ["COMBINATIONS", "CombineOptions", "CombineReport", "combine_adapters"]


def __getattr__(name: str) -> Any:
    if name == "combine_adapters":
        from surgeon.workflows.combine.run import combine_adapters

        return combine_adapters
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
