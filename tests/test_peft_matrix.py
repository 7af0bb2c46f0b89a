"""Conformance with peft on PEFT's own custom-model test matrix (``tests/_peft_matrix_cases.py``: every
configuration of ``TEST_CASES`` and ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``, ~400 cases on small MLP,
embedding, GPT-2 Conv1D, Conv1d/2d/3d, LayerNorm, MultiheadAttention and parameter-only models).

Each case is built with peft, its adapter moved off its identity initialization, saved, and merged
twice: with ``surgeon merge --dtype fp32`` (the CLI, in-process) and with peft's ``merge_and_unload()``.
Every case peft merges must come out with the same tensors, bit for bit (unless ``NOT_BIT_IDENTICAL``
in ``_peft_matrix`` states why not); every case peft cannot merge must be refused with one ``Error:``
line. ``python tests/_peft_matrix.py`` prints the counts per tuner.
"""

from __future__ import annotations

import pytest

from _peft_matrix import NOT_BIT_IDENTICAL, all_cases, run_case

CASES = all_cases()


@pytest.mark.parametrize("name,model_id,cls_name,configs", CASES, ids=[c[0] for c in CASES])
def test_surgeon_merges_what_peft_merges_and_refuses_the_rest(name, model_id, cls_name, configs, tmp_path):
    outcome = run_case(name, model_id, cls_name, configs, tmp_path)
    if outcome.status == "unbuildable":
        pytest.skip(f"peft cannot build this case here: {outcome.detail}")
    if name in NOT_BIT_IDENTICAL:
        assert outcome.status in ("bit-identical", "close"), outcome
        return
    assert outcome.status in ("bit-identical", "refused"), outcome


def test_the_matrix_covers_every_tuner_of_the_installed_peft():
    """The transcribed matrix is not stale: every weight-based tuner the installed peft knows appears in it
    (prompt learning and run-time routing methods have no weights to merge)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from surgeon.io.adapter import PROMPT_LEARNING_TYPES, RUNTIME_ONLY_TYPES

    in_matrix = {c for _, _, c, _ in CASES}
    missing = {getattr(t, "value", t) for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items() if cls.__name__ not in in_matrix}
    missing -= {*PROMPT_LEARNING_TYPES, *RUNTIME_ONLY_TYPES, "SHADOW"}  # peft tests ShadowPEFT on decoders only
    assert not missing
