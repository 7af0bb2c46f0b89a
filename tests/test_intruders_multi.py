"""`surgeon intruders TUNED... --base BASE`: several fine-tunes side by side, the base decomposed once.

References: each model analysed alone (fresh, no cache), and peft's own merge for the
checkpoint given next to its adapter; the count of base decompositions is read off the
cache folder (one file per decomposed base matrix).
"""

from __future__ import annotations

import json

from click.testing import CliRunner

from _spectral_helpers import llama_lora, save_merged  # noqa: F401
from surgeon.cli.main import cli
from surgeon.workflows.spectral.intruders import find_intruders
from surgeon.workflows.spectral.multi import find_intruders_many


def test_models_equal_separate_runs_and_base_decomposed_once(tiny_llama, llama_lora, tmp_path):
    merged = save_merged(tiny_llama, llama_lora, tmp_path / "merged", kind="causal")
    tuned = [llama_lora, merged, llama_lora]  # an adapter, a checkpoint, the adapter again
    cache = tmp_path / "cache"
    report = find_intruders_many(tuned, tiny_llama, cache=cache)
    assert len(report.models) == 3
    for path, model in zip(tuned, report.models):
        alone = find_intruders(path, tiny_llama, use_cache=False)
        assert [(m.name, m.intruders) for m in model.matrices] == [(m.name, m.intruders) for m in alone.matrices]
        assert model.totals == alone.totals
    analysed = {m.name for model in report.models for m in model.matrices if m.status == "analysed"}
    assert analysed and len(list(cache.rglob("*.safetensors"))) == len(analysed)
    assert report.cache["misses"] == len(analysed)
    assert report.cache["hits"] == sum(model.totals["analysed"] for model in report.models) - len(analysed)
    assert [m.cache["misses"] for m in report.models][1:] == [0, 0]


def test_no_cache_still_decomposes_once_and_leaves_nothing(tiny_llama, llama_lora, tmp_path):
    report = find_intruders_many([llama_lora, llama_lora], tiny_llama, use_cache=False)
    n = report.models[0].totals["analysed"]
    assert report.cache == {"dir": None, "hits": n, "misses": n, "computed": 0}


def test_cli_json_has_models_in_order_and_text_side_by_side(tiny_llama, llama_lora, tmp_path):
    merged = save_merged(tiny_llama, llama_lora, tmp_path / "merged", kind="causal")
    runner = CliRunner()
    args = ["intruders", str(merged), str(llama_lora), "--base", str(tiny_llama), "--cache", str(tmp_path / "c")]
    result = runner.invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert [m["tuned"] for m in body["models"]] == [str(merged), None]
    assert body["models"][1]["adapter"] == str(llama_lora)
    alone = find_intruders(merged, tiny_llama, use_cache=False)
    assert body["models"][0]["totals"] == json.loads(json.dumps(alone.totals))
    text = runner.invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "model 1" in text.output and "model 2" in text.output and "intruders" in text.output
    one = runner.invoke(cli, ["intruders", str(llama_lora), "--base", str(tiny_llama), "--no-cache", "--json"])
    assert "models" not in json.loads(one.output)  # one TUNED: today's document


def test_adapter_option_with_several_tuned_is_refused(tiny_llama, llama_lora):
    result = CliRunner().invoke(cli, ["intruders", str(llama_lora), str(llama_lora), "--base", str(tiny_llama),
                                      "--adapter", str(llama_lora)])
    assert result.exit_code != 0 and "--adapter" in result.output and "Traceback" not in result.output


def test_plots_of_several_models_go_to_one_folder_each(tiny_llama, llama_lora, tmp_path):
    report = find_intruders_many([llama_lora, llama_lora], tiny_llama, use_cache=False, plot=tmp_path / "figs")
    folders = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert folders == [f"1-{llama_lora.name}", f"2-{llama_lora.name}"]
    for model in report.models:
        assert model.plots and all(str(tmp_path / "figs") in p for p in model.plots)
