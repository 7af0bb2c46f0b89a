"""`--html FILE` pages of `intruders`, `scale-intruders` and `spectrum`: self-contained, rendered in headless Chromium.

Checked on the file: every figure is an embedded PNG that decodes (no file or network
reference anywhere), one figure per plot the page promises, the embedded JSON equals the
command's --json. Checked in Chromium (offline: its proxy is a closed port): the
screenshot is not blank, and it has far more colours than the same page with its images
stripped, so the embedded plots did render. Skips, saying why, where Chromium is missing.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from _page_helpers import embedded as _embedded
from _page_helpers import images as _images
from _page_helpers import rendered as _rendered
from _page_helpers import self_contained as _self_contained
from _spectral_helpers import geometric_matrix, llama_lora, save_matrices  # noqa: F401
from surgeon.cli.main import cli

pytest.importorskip("matplotlib")
NAME, OTHER = "model.layers.0.mlp.proj.weight", "model.layers.1.mlp.proj.weight"


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("html")
    w0, w1 = geometric_matrix(150, 100, decay=0.85), geometric_matrix(150, 100, decay=0.85, seed=3)
    gen = torch.Generator().manual_seed(7)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, generator=gen, dtype=torch.float64), dim=0)  # noqa: E731
    x, z, y = ((unit(150), unit(100)) for _ in range(3))
    plant = lambda *ps: w0 + sum(s * torch.outer(a, b) for s, (a, b) in ps)  # noqa: E731
    weights = [plant((4.0, x), (3.0, z)), plant((4.0, x), (3.0, z), (2.5, y)), plant((4.0, x), (2.5, y))]
    base = save_matrices(root / "base.safetensors", {NAME: w0, OTHER: w1}, dtype=torch.float64)
    return base, [save_matrices(root / f"stage{i}.safetensors", {NAME: w, OTHER: w1 * 1.01}, dtype=torch.float64)
                  for i, w in enumerate(weights, 1)]


def test_sequence_page(stages, tmp_path):
    base, paths = stages
    page = tmp_path / "seq.html"
    args = ["intruders", *map(str, paths), "--base", str(base), "--targets", "proj", "--no-cache", "--sequence"]
    result = CliRunner().invoke(cli, [*args, "--html", str(page), "--json"])
    assert result.exit_code == 0, result.output
    text = page.read_text(encoding="utf-8")
    _self_contained(text)
    # stages bars + per-layer bars + ε sweep + (heat-map + spectra) × 2 matrices × 3 stages
    assert len(_images(text)) == 3 + 2 * 2 * 3
    body = json.loads(result.output)
    data = _embedded(text)
    assert [m["totals"] for m in data["models"]] == [m["totals"] for m in body["models"]]
    assert [s["new"] for s in data["sequence"]["stages"]] == [2, 1, 0]
    assert "Across the stages" in text and "born at stage" in text
    _rendered(page, tmp_path)


def test_several_models_page(tiny_llama, llama_lora, tmp_path):
    page = tmp_path / "many.html"
    result = CliRunner().invoke(cli, ["intruders", str(llama_lora), str(llama_lora), "--base", str(tiny_llama),
                                      "--no-cache", "--html", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text(encoding="utf-8")
    _self_contained(text)
    assert len(_images(text)) == 2 + 2 * 2 * 2
    assert len(_embedded(text)["models"]) == 2
    _rendered(page, tmp_path)


def test_scale_page_before_and_after(stages, tmp_path):
    base, paths = stages
    page = tmp_path / "scale.html"
    result = CliRunner().invoke(cli, ["scale-intruders", str(paths[1]), "--base", str(base), "--targets", "proj",
                                      "--no-cache", "--lambda", "0", "-o", str(tmp_path / "out"), "--html", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text(encoding="utf-8")
    _self_contained(text)
    data = _embedded(text)
    assert data["before"]["totals"]["intruders"] == 3 and data["after"]["totals"]["intruders"] == 0
    assert len(data["scale"]["changes"]) == 1 and "What was rescaled" in text
    assert len(_images(text)) == 2 + 2 * 2 * 2
    _rendered(page, tmp_path)


def test_spectrum_page(tiny_llama, tmp_path):
    page = tmp_path / "spectrum.html"
    result = CliRunner().invoke(cli, ["spectrum", str(tiny_llama), "--full", "--html", str(page), "--json"])
    assert result.exit_code == 0, result.output
    text = page.read_text(encoding="utf-8")
    _self_contained(text)
    assert len(_images(text)) == 3
    assert _embedded(text)["matrices"] == json.loads(result.output)["matrices"]
    _rendered(page, tmp_path)


def test_html_path_errors_before_work(stages, tmp_path):
    base, paths = stages
    result = CliRunner().invoke(cli, ["intruders", str(paths[0]), "--base", str(base), "--html", str(tmp_path)])
    assert result.exit_code != 0 and "is a folder" in result.output and "Traceback" not in result.output
    missing = tmp_path / "no" / "page.html"
    result = CliRunner().invoke(cli, ["spectrum", str(base), "--html", str(missing)])
    assert result.exit_code != 0 and "no such folder" in result.output


def test_one_model_page_has_every_figure(stages, tmp_path):
    base, paths = stages
    page = tmp_path / "one.html"
    result = CliRunner().invoke(cli, ["intruders", str(paths[0]), "--base", str(base), "--targets", "proj",
                                      "--no-cache", "--html", str(page), "--json"])
    assert result.exit_code == 0, result.output
    text = page.read_text(encoding="utf-8")
    _self_contained(text)
    assert len(_images(text)) == 2 + 2 * 2  # per layer, ε sweep; heat-map + spectra for both matrices
    assert _embedded(text)["totals"] == json.loads(result.stdout)["totals"]
