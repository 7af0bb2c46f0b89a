"""Model cards rendered from surgeon_provenance.json (no network: inputs are resolved against a hand-made HF cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgeon.io.model_card import BEGIN, END, card_metadata, render_card, split_front_matter
from surgeon.provenance import PROVENANCE_FILE, provenance, provenance_file_text

BASE_SHA = "a" * 40


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache where org/base@main was fetched at BASE_SHA with an apache-2.0 card."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--base"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(BASE_SHA)
    (repo / "snapshots" / BASE_SHA).mkdir(parents=True)
    (repo / "snapshots" / BASE_SHA / "README.md").write_text("---\nlicense: apache-2.0\n---\nbase card\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    monkeypatch.chdir(tmp_path)
    return cache


def output(tmp_path: Path, command: str, parameters: dict, inputs: dict, *, report: dict | None = None,
           adapter: bool = False) -> Path:
    folder = tmp_path / f"out-{command}"
    folder.mkdir()
    (folder / ("adapter_config.json" if adapter else "config.json")).write_text("{}")
    record = provenance(command, parameters, inputs=inputs)
    (folder / PROVENANCE_FILE).write_text(provenance_file_text(record, report))
    return folder


def test_merge_of_one_adapter_is_a_finetune_of_the_base(tmp_path: Path, hf_cache: Path) -> None:
    folder = output(tmp_path, "merge", {"dtype": "BF16"}, {"base": "org/base", "adapter": "org/lora"})
    assert card_metadata(folder, json.loads((folder / PROVENANCE_FILE).read_text())) == {
        "base_model": "org/base", "base_model_relation": "finetune", "license": "apache-2.0",
        "library_name": "transformers", "tags": ["surgeon", "merge"]}


def test_several_inputs_are_a_merge(tmp_path: Path, hf_cache: Path) -> None:
    folder = output(tmp_path, "apply", {"lambdas": [0.5, 0.3]},
                    {"base": "org/base", "task_vectors": ["org/tv-math@v2", "./local-tv"]})
    card = render_card(folder, repo_id="me/merged")
    meta, body = split_front_matter(card)
    assert meta["base_model"] == ["org/base", "org/tv-math"] and meta["base_model_relation"] == "merge"
    assert "| lambdas | `[0.5, 0.3]` |" not in body  # lists of floats are shown plainly
    assert "| lambdas | [0.5, 0.3] |" in body
    assert f"| base | [org/base](https://hub.example/org/base) | main | `{BASE_SHA}` |" in body
    assert "| task_vectors[0] | [org/tv-math](https://hub.example/org/tv-math) | v2 | unknown |" in body
    assert "| task_vectors[1] | `./local-tv` | local | - |" in body


def test_adapter_output(tmp_path: Path, hf_cache: Path) -> None:
    folder = output(tmp_path, "extract-lora", {"rank": 8}, {"tuned": "org/tuned", "base": "org/base"}, adapter=True)
    meta, body = split_front_matter(render_card(folder, repo_id="me/lora"))
    assert meta == {"base_model": "org/base", "base_model_relation": "adapter", "license": "apache-2.0",
                    "library_name": "peft", "tags": ["surgeon", "extract-lora"]}
    assert "This PEFT adapter was produced by surgeon" in body


def test_scale_intruders_card_has_the_intruder_table(tmp_path: Path, hf_cache: Path) -> None:
    report = {"lambda": 0.5, "layers": [
        {"tensor": "model.layers.0.mlp.down_proj.weight", "intruders": 2, "similarities": [0.31, 0.42], "scaled": True},
        {"tensor": "model.layers.1.mlp.down_proj.weight", "intruders": 0, "similarities": [], "scaled": False},
    ]}
    folder = output(tmp_path, "scale-intruders", {"lambda": 0.5, "epsilon": 0.5},
                    {"tuned": "org/tuned@refs/pr/1", "base": "org/base"}, report=report)
    meta, body = split_front_matter(render_card(folder, repo_id="me/repaired"))
    assert meta["base_model"] == "org/tuned" and meta["base_model_relation"] == "finetune"
    assert "license" not in meta  # org/tuned's card is not in the cache
    assert "### Intruder dimensions per layer" in body
    assert "| tensor | intruders | similarities | scaled |" in body
    assert "| model.layers.0.mlp.down_proj.weight | 2 | [0.31, 0.42] | True |" in body
    assert "| model.layers.1.mlp.down_proj.weight | 0 | [] | False |" in body
    assert "| tuned | [org/tuned](https://hub.example/org/tuned) | refs/pr/1 | unknown |" in body


def test_local_inputs_give_no_base_model_but_keep_the_license(tmp_path: Path, hf_cache: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\n---\n")
    folder = output(tmp_path, "merge", {}, {"base": str(base), "adapter": "./lora"})
    meta = card_metadata(folder, json.loads((folder / PROVENANCE_FILE).read_text()))
    assert meta == {"license": "other", "license_name": "llama3", "license_link": "LICENSE",
                    "library_name": "transformers", "tags": ["surgeon", "merge"]}


def test_update_replaces_only_the_surgeon_section(tmp_path: Path, hf_cache: Path) -> None:
    folder = output(tmp_path, "merge", {"dtype": "F16"}, {"base": "org/base", "adapter": "org/lora"})
    existing = f"---\nlicense: mit\nbase_model: someone/else\n---\n# Title\n\n{BEGIN}\nold section\n{END}\n\nFooter.\n"
    meta, body = split_front_matter(render_card(folder, repo_id="me/m", existing=existing))
    assert meta["license"] == "mit" and meta["base_model"] == "org/base"
    assert body.startswith("\n# Title\n\n" + BEGIN + "\n## Surgery") and body.endswith(f"{END}\n\nFooter.\n")
    assert "old section" not in body and "| dtype | F16 |" in body


def test_folder_without_provenance(tmp_path: Path, hf_cache: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    meta, body = split_front_matter(render_card(folder, repo_id="me/plain"))
    assert meta == {"library_name": "transformers", "tags": ["surgeon"]}
    assert "carries no surgeon_provenance.json" in body
