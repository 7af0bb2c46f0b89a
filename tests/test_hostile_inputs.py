"""Class 1 of issue 15: no command writes into any of its inputs (--base, --adapter, --continue-from,
task vectors, data files), also when the output names it through a symlink, `..` or a hard link."""

from __future__ import annotations

import os

import pytest

from _hostile_helpers import digest, inputs_of, invoke, leftovers, one_line, world  # noqa: F401

OVERLAP = "overlaps the input"


def _cases(w):
    b, a, m, tv, data = w["base"], w["adapter"], w["merged"], w["tv"], w["data"]
    return {
        # the case of the issue: --adapter was not counted as an input
        "diff -o ADAPTER": ["diff", m, b, "--adapter", a, "-o", a, "--overwrite"],
        "diff -o ADAPTER/..": ["diff", m, b, "--adapter", a, "-o", a / ".." / a.name, "--overwrite"],
        "diff -o inside ADAPTER": ["diff", m, b, "--adapter", a, "-o", a / "tau"],
        "merge -o BASE": ["merge", b, a, "-o", b, "--overwrite"],
        "merge -o ADAPTER/sub": ["merge", b, a, "-o", a / "sub"],
        "apply -o TASK_VECTOR": ["apply", b, tv, "-o", tv, "--overwrite"],
        "apply -o folder holding BASE": ["apply", b, tv, "-o", w["root"], "--overwrite"],
        "extract-lora -o TUNED": ["extract-lora", m, b, "-r", "2", "-o", m, "--overwrite"],
        "scale-intruders -o BASE": ["scale-intruders", m, "--base", b, "--lambda", "0.5", "-o", b, "--overwrite"],
        "convert -o BASE file": ["convert", b / "model.safetensors", "-o", b / "model.safetensors", "--overwrite"],
        "finetune -o DATA folder": ["finetune", b, "--data", data / "train.jsonl", "--task", "causal-lm",
                                    "-o", data, "--overwrite"],
        "finetune -o --continue-from": ["finetune", b, "--data", data / "train.jsonl", "--task", "causal-lm",
                                        "--continue-from", a, "-o", a, "--overwrite"],
    }


CASES = ["diff -o ADAPTER", "diff -o ADAPTER/..", "diff -o inside ADAPTER", "merge -o BASE", "merge -o ADAPTER/sub",
         "apply -o TASK_VECTOR", "apply -o folder holding BASE", "extract-lora -o TUNED", "scale-intruders -o BASE",
         "convert -o BASE file", "finetune -o DATA folder", "finetune -o --continue-from"]


@pytest.mark.parametrize("case", CASES)
def test_output_on_an_input_is_refused(world, case):  # noqa: F811
    before = inputs_of(world)
    one_line(invoke(*_cases(world)[case]), 1, OVERLAP, "surgeon never writes over its inputs")
    assert inputs_of(world) == before
    for folder in (world["root"], world["adapter"], world["base"], world["data"]):
        assert leftovers(folder) == []


def test_output_through_a_symlink_to_an_input(world, tmp_path):  # noqa: F811
    link = tmp_path / "looks-new"
    link.symlink_to(world["adapter"], target_is_directory=True)
    before = inputs_of(world)
    one_line(invoke("diff", world["merged"], world["base"], "--adapter", world["adapter"], "-o", link, "--overwrite"),
             1, OVERLAP)
    one_line(invoke("merge", world["base"], world["adapter"], "-o", link / "x"), 1, OVERLAP)
    assert inputs_of(world) == before and link.is_symlink()


def test_output_that_is_a_hard_link_of_an_input(world, tmp_path):  # noqa: F811
    twin = tmp_path / "twin.safetensors"
    os.link(world["base"] / "model.safetensors", twin)
    before = inputs_of(world)
    one_line(invoke("convert", world["base"], "-o", twin, "--overwrite"), 1, OVERLAP)
    assert inputs_of(world) == before and os.path.samefile(twin, world["base"] / "model.safetensors")


def test_an_input_reached_through_a_symlink_is_protected(world, tmp_path):  # noqa: F811
    alias = tmp_path / "alias-adapter"
    alias.symlink_to(world["adapter"], target_is_directory=True)
    before = inputs_of(world)
    one_line(invoke("diff", world["merged"], world["base"], "--adapter", alias, "-o", world["adapter"], "--overwrite"),
             1, OVERLAP)
    assert inputs_of(world) == before
