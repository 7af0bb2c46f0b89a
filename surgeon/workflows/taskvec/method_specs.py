"""mergekit's merge methods as data: the names `surgeon apply --method` offers and what each one does.

Torch-free, so that ``surgeon apply --help`` lists them without loading torch; the methods
themselves are computed in :mod:`surgeon.workflows.taskvec.methods`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    """One mergekit method: its sparsification, sign consensus and defaults (mergekit 0.1.5's registry)."""

    sparsify: str | None = None  # magnitude | random | magnitude_outliers | della
    consensus: bool = False
    normalize: bool = False
    rescale: bool = False
    kind: str = "gta"  # gta (generalized task arithmetic) | model_stock | slerp


METHODS: dict[str, MethodSpec] = {
    "task_arithmetic": MethodSpec(),
    "ties": MethodSpec("magnitude", consensus=True, normalize=True),
    "dare_linear": MethodSpec("random", rescale=True),
    "dare_ties": MethodSpec("random", consensus=True, rescale=True),
    "breadcrumbs": MethodSpec("magnitude_outliers"),
    "breadcrumbs_ties": MethodSpec("magnitude_outliers", consensus=True),
    "della": MethodSpec("della", consensus=True, normalize=True, rescale=True),
    "della_linear": MethodSpec("della", rescale=True),
    "magnitude_prune": MethodSpec("magnitude"),  # TIES without the sign election (peft's magnitude_prune)
    "model_stock": MethodSpec(kind="model_stock"),
    "slerp": MethodSpec(kind="slerp"),
}
RANDOM_METHODS = {name for name, spec in METHODS.items() if spec.sparsify in ("random", "della")}
