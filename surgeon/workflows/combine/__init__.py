"""Combining adapters: peft's add_weighted_adapter (plan, module-by-module run) and convert_to_lora."""

from surgeon.workflows.combine.plan import COMBINATIONS, CombineOptions, CombineReport
from surgeon.workflows.combine.run import combine_adapters

__all__ = ["COMBINATIONS", "CombineOptions", "CombineReport", "combine_adapters"]
