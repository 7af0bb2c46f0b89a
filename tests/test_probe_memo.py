"""The memo of measured merge routes (io.probe_cache, workflows.merge.exactness): answers survive a process,
a memo others could have written is never believed, a broken one is ignored, and nothing is an error."""

from __future__ import annotations

import json
import os

from surgeon.io.probe_cache import ProbeMemo
from surgeon.ops import native_merge
from surgeon.workflows.merge import exactness


def test_answers_are_remembered_in_a_private_folder(tmp_path):
    folder = tmp_path / "memo"
    memo = ProbeMemo(folder, "kind", "key", native_merge.private_path)
    memo.record("native:8x8:r2:N:c1:w1", False)
    memo.record("blocks:8x8:r2:N:c1:w1", True)
    again = ProbeMemo(folder, "kind", "key", native_merge.private_path)
    assert again.answers == {"native:8x8:r2:N:c1:w1": False, "blocks:8x8:r2:N:c1:w1": True}
    assert oct(os.stat(folder).st_mode & 0o777) == "0o700"
    assert not list(folder.glob(".*.tmp"))  # written through a temporary file, renamed into place


def test_a_memo_others_could_write_or_a_broken_one_is_not_believed(tmp_path):
    folder = tmp_path / "memo"
    folder.mkdir(mode=0o700)
    planted = folder / "kind-key.json"
    planted.write_text(json.dumps({"native:8x8:r2:N:c1:w1": True}))
    os.chmod(planted, 0o666)  # writable by anyone: a planted answer would make a merge inexact
    assert ProbeMemo(folder, "kind", "key", native_merge.private_path).answers == {}
    os.chmod(planted, 0o600)
    planted.write_text("{not json")
    assert ProbeMemo(folder, "kind", "key", native_merge.private_path).answers == {}
    planted.write_text(json.dumps({"a": "yes", "b": True}))  # only booleans count
    assert ProbeMemo(folder, "kind", "key", native_merge.private_path).answers == {"b": True}


def test_an_unwritable_memo_folder_still_answers(tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    memo = ProbeMemo(blocked / "memo", "kind", "key", native_merge.private_path)
    memo.record("x", True)  # cannot be saved: kept for this process, no error
    assert memo.answers == {"x": True}


def test_a_measured_shape_is_read_from_the_memo_the_next_time(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = exactness.Exactness(native_merge.kernel(), chunk=1 << 17, workers=2)
    answer = first.blocks(48, 40, [3], fan_in_fan_out=False)
    assert first.measured == 1
    second = exactness.Exactness(native_merge.kernel(), chunk=1 << 17, workers=2)
    assert second.blocks(48, 40, [3], fan_in_fan_out=False) == answer and second.measured == 0
    assert answer  # one block is the whole product itself
