"""Merging adapters into a base: plan (headers only), per-tensor apply, streamed execution.

``from surgeon.workflows.merge import merge`` is the public entry point, as before the
package split.
"""

from surgeon.workflows.merge.plan import MergeOp, MergePlan, plan_adapter_merge
from surgeon.workflows.merge.run import MergeReport, TensorMerge, merge, merged_float32

__all__ = ["MergeOp", "MergePlan", "MergeReport", "TensorMerge", "merge", "merged_float32", "plan_adapter_merge"]
