"""Issue 15, messages with a wrong remedy: a PEFT adapter folder given where a model or a task vector
belongs. Read as a checkpoint its tensors match none of the base's, so `diff` printed "only in base: 21
tensors" with exit 0, `extract-lora` said nothing changed and `apply` blamed the base. Each now says
what the folder is and which command takes it, in one line, and writes nothing."""

from __future__ import annotations

import pytest

from _hostile_helpers import inputs_of, invoke, leftovers, one_line, world  # noqa: F401


@pytest.mark.parametrize("args,expected,remedy", [
    (["diff", "{adapter}", "{base}"], "a model", "surgeon diff MERGED BASE --adapter ADAPTER"),
    (["diff", "{merged}", "{adapter}"], "a model", "surgeon diff MERGED BASE --adapter ADAPTER"),
    (["diff", "{adapter}", "{base}", "-o", "{out}"], "a model", "merge it first with `surgeon merge`"),
    (["extract-lora", "{adapter}", "{base}", "-r", "2", "-o", "{out}"], "a fine-tuned model",
     "surgeon combine ADAPTER --method svd --svd-rank R"),
    (["extract-lora", "{merged}", "{adapter}", "-r", "2", "-o", "{out}"], "a base model", "the fine-tune started from"),
    (["apply", "{base}", "{adapter}", "-o", "{out}"], "a model or task vector", "surgeon merge BASE ADAPTER"),
    (["apply", "{base}", "{tv}", "{adapter}:0.5", "--method", "ties", "--density", "0.5", "-o", "{out}"],
     "a model or task vector", "surgeon combine"),
    (["apply", "{adapter}", "{tv}", "-o", "{out}"], "a model or task vector", "surgeon merge BASE ADAPTER"),
    (["merge", "{adapter}", "{adapter}", "-o", "{out}"], "a base model", "surgeon merge BASE ADAPTER [ADAPTER...]"),
    (["spectrum", "{adapter}", "-o", "{out}.json"], "a model", "surgeon intruders ADAPTER --base BASE"),
])
def test_an_adapter_where_a_model_belongs(world, tmp_path, args, expected, remedy):  # noqa: F811
    before = inputs_of(world)
    out = tmp_path / "out"
    paths = {k: world[k] for k in ("base", "adapter", "merged", "tv")}
    result = invoke(*[a.format(out=out, **paths) for a in args])
    one_line(result, 1, f"{world['adapter']}: is a PEFT adapter, not {expected};", remedy)
    assert not out.exists() and leftovers(tmp_path) == []
    assert inputs_of(world) == before


def test_the_adapter_check_itself_still_takes_the_adapter(world):  # noqa: F811
    result = invoke("diff", world["merged"], world["base"], "--adapter", world["adapter"])
    assert result.exit_code == 0 and "EQUIVALENT" in result.output, result.output


def test_messages_that_had_no_remedy(world, tmp_path):  # noqa: F811
    one_line(invoke("merge", world["base"], world["adapter"], "-o", tmp_path / "m", "--max-shard-size", "0"), 1,
             "shard size '0' must be positive; write it like 5GB, 500MB or 2GiB.")
