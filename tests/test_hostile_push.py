"""Class 8 of issue 15: `push --base-model REPO_ID` (and on --push-to) names the base in the card when
the provenance has no Hub input; config.json's `_name_or_path` fills it when that is a Hub repo id; a
local path never goes into a card. Against the local fake Hub of tests/_hub_helpers.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _hostile_helpers import digest, invoke, one_line, world  # noqa: F401
from _hub_helpers import WRITE_TOKEN, FakeHub, fake_hub  # noqa: F401 - fake_hub is a fixture
from surgeon.io.model_card import card_metadata, split_front_matter
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text
from surgeon.workflows.convert import convert_checkpoint


@pytest.fixture
def out(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    folder = tmp_path / "out"
    convert_checkpoint(tiny_llama, folder)  # provenance: one local input, so no base_model of its own
    return folder


def _card(hub: FakeHub, repo: str) -> dict:
    meta, _ = split_front_matter(hub.files(repo)["README.md"].decode())
    return meta


def _name_or_path(folder: Path, value: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["_name_or_path"] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_push_base_model_fills_the_card(fake_hub: FakeHub, out: Path) -> None:  # noqa: F811
    before = digest(out)
    result = invoke("push", out, "tester/a", "--base-model", "org/real-base")
    assert result.exit_code == 0, result.output
    meta = _card(fake_hub, "tester/a")
    assert meta["base_model"] == "org/real-base" and meta["base_model_relation"] == "finetune"
    assert digest(out) == before


def test_name_or_path_repo_id_fills_the_card(fake_hub: FakeHub, out: Path) -> None:  # noqa: F811
    _name_or_path(out, "org/from-config")
    assert invoke("push", out, "tester/b").exit_code == 0
    assert _card(fake_hub, "tester/b")["base_model"] == "org/from-config"


@pytest.mark.parametrize("local", ["/models/llama", "./llama", "../llama"])
def test_a_local_name_or_path_never_goes_into_the_card(fake_hub: FakeHub, out: Path, local: str) -> None:  # noqa: F811
    _name_or_path(out, local)
    assert invoke("push", out, "tester/c").exit_code == 0
    meta = _card(fake_hub, "tester/c")
    assert "base_model" not in meta and local not in fake_hub.files("tester/c")["README.md"].decode()


def test_base_model_that_is_a_local_path_is_refused(fake_hub: FakeHub, out: Path, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "base").mkdir()
    local = str(tmp_path / "org" / "base")
    for value in (local, "org/base@v1", "not a repo"):
        one_line(invoke("push", out, "tester/d", "--base-model", value), 1,
                 f"--base-model {value!r}: give the Hub repo id of the base model (org/name, no @revision)")
    assert "tester/d" not in fake_hub.repos


def test_push_to_takes_base_model_too(fake_hub: FakeHub, world: dict, tmp_path: Path,  # noqa: F811
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    result = invoke("merge", world["base"], world["adapter"], "-o", tmp_path / "m", "--push-to", "tester/e",
                    "--base-model", "org/llama-base")
    assert result.exit_code == 0, result.output
    meta = _card(fake_hub, "tester/e")
    assert meta["base_model"] == "org/llama-base" and meta["base_model_relation"] == "finetune"


def test_base_model_against_a_recorded_hub_base_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    record = provenance("merge", {}, inputs={"base": "org/recorded", "adapter_0": "./lora"})
    (folder / PROVENANCE_FILE).write_text(provenance_file_text(record))
    assert card_metadata(folder, record)["base_model"] == "org/recorded"
    with pytest.raises(Exception, match="provenance already records the Hub base org/recorded; drop --base-model"):
        card_metadata(folder, record, base_model="org/other")


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A BERT with its tokenizer, a copy of its weights without any tokenizer file, and texts."""
    import shutil

    from _finetune_helpers import build_model

    root = tmp_path_factory.mktemp("eval-tok")
    full = build_model("bert", root / "bert")
    bare = root / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(full / name, bare / name)
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"a good day {i}"}) + "\n" for i in range(6)))
    return full, bare, texts


def test_eval_without_tokenizer_files_uses_drift_from_and_says_so(bert_pair) -> None:
    full, bare, texts = bert_pair
    before = digest(full, bare)
    result = invoke("eval", bare, "--data", texts, "--drift-from", full)
    assert result.exit_code == 0, result.output
    assert f"  tokenizer:   from {full}\n" in result.output
    report = json.loads(invoke("eval", bare, "--data", texts, "--drift-from", full, "--json").stdout)
    assert report["tokenizer"] == str(full) and report["drift"]["mean_cosine"] == pytest.approx(1.0)
    assert digest(full, bare) == before


def test_eval_tokenizer_option_and_the_error_without_one(bert_pair) -> None:
    full, bare, texts = bert_pair
    report = json.loads(invoke("eval", bare, "--data", texts, "--drift-from", bare, "--tokenizer", full, "--json").stdout)
    assert report["tokenizer"] == str(full)
    one_line(invoke("eval", bare, "--data", texts, "--drift-from", bare), 1,
             f"{bare}, {bare}: no tokenizer files", "pass --tokenizer PATH (the base model's folder)")
