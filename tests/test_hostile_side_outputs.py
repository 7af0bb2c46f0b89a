"""Class 2 of issue 15: side outputs (precision report, spectrum -o, intruders --plot) follow the rules
of checkpoints: never into an input, never over a file without --overwrite, checked before the main
output is published (so a report that cannot be written leaves no checkpoint), written atomically."""

from __future__ import annotations

import json

import pytest

from _hostile_helpers import digest, inputs_of, invoke, leftovers, one_line, tmpfs, world  # noqa: F401


def test_precision_report_into_the_base_config_is_refused(world, tmp_path):  # noqa: F811
    before = inputs_of(world)
    for extra in ([], ["--overwrite"]):
        out = tmp_path / f"merged{len(extra)}"
        one_line(invoke("merge", world["base"], world["adapter"], "-o", out, "--precision-report",
                        world["base"] / "config.json", *extra), 1, "the precision report overlaps the input")
        assert not out.exists()
    assert inputs_of(world) == before
    assert leftovers(tmp_path) == [] and leftovers(world["base"]) == []


def test_precision_report_inside_the_merged_folder_is_refused(world, tmp_path):  # noqa: F811
    # The merged folder is published whole (and swapped away by the next --overwrite): a report written
    # into it afterwards would be a file its provenance does not list. Same rule as --html.
    out = tmp_path / "merged"
    for extra in ([], ["--overwrite"]):
        one_line(invoke("merge", world["base"], world["adapter"], "-o", out, "--precision-report",
                        out / "precision.json", *extra), 1,
                 "the precision report would be written into the output", "choose a precision report path outside it")
        assert not out.exists() and leftovers(tmp_path) == []


def test_existing_precision_report_is_refused_before_the_checkpoint(world, tmp_path):  # noqa: F811
    report = tmp_path / "precision.json"
    report.write_text("mine\n")
    out = tmp_path / "merged"
    one_line(invoke("merge", world["base"], world["adapter"], "-o", out, "--precision-report", report), 1,
             f"{report}: the precision report file exists; choose another or pass --overwrite")
    assert not out.exists() and report.read_text() == "mine\n"
    result = invoke("merge", world["base"], world["adapter"], "-o", out, "--precision-report", report, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())  # replaced, atomically: no temporary left beside it
    assert leftovers(tmp_path) == []


def test_precision_report_on_a_read_only_disk_fails_before_the_checkpoint(world, tmp_path):  # noqa: F811
    with tmpfs("1m", read_only=True) as ro:
        out = tmp_path / "merged"
        one_line(invoke("merge", world["base"], world["adapter"], "-o", out, "--precision-report", ro / "p.json"), 1,
                 f"{ro / 'p.json'}: the file system is read-only; choose an output on a writable disk.")
        assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("name,extra", [("config.json", ["--overwrite"]), ("spec.json", []),
                                        ("singular.safetensors", [])])
def test_spectrum_output_inside_the_model_is_refused(world, name, extra):  # noqa: F811
    before = inputs_of(world)
    one_line(invoke("spectrum", world["base"], "-o", world["base"] / name, *extra), 1, "overlaps the input")
    assert inputs_of(world) == before and leftovers(world["base"]) == []


def test_spectrum_output_over_a_file_needs_overwrite(world, tmp_path):  # noqa: F811
    target = tmp_path / "spec.json"
    target.write_text("keep\n")
    one_line(invoke("spectrum", world["base"], "-o", target), 1, "file exists; choose another or pass --overwrite")
    assert target.read_text() == "keep\n"
    assert invoke("spectrum", world["base"], "-o", target, "--overwrite").exit_code == 0
    assert json.loads(target.read_text())["matrices"] and leftovers(tmp_path) == []


def test_intruders_plot_into_an_input_is_refused(world):  # noqa: F811
    pytest.importorskip("matplotlib")
    before = inputs_of(world)
    for folder in (world["base"], world["adapter"] / "figs"):
        one_line(invoke("intruders", "--base", world["base"], "--adapter", world["adapter"], "--plot", folder), 1,
                 "the plot folder overlaps the input")
    assert inputs_of(world) == before and not (world["adapter"] / "figs").exists()


def test_intruders_plot_never_replaces_a_figure(world, tmp_path):  # noqa: F811
    pytest.importorskip("matplotlib")
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "epsilon-sweep.png").write_bytes(b"mine")
    one_line(invoke("intruders", "--base", world["base"], "--adapter", world["adapter"], "--plot", figs), 1,
             "already holds epsilon-sweep.png; surgeon never replaces a figure, choose an empty --plot DIR.")
    assert (figs / "epsilon-sweep.png").read_bytes() == b"mine" and [p.name for p in figs.iterdir()] == ["epsilon-sweep.png"]


def test_html_page_into_an_input_is_refused(world):  # noqa: F811
    pytest.importorskip("matplotlib")
    before = inputs_of(world)
    one_line(invoke("spectrum", world["base"], "--html", world["base"] / "config.json"), 1,
             "the page overlaps the input")
    one_line(invoke("intruders", "--base", world["base"], "--adapter", world["adapter"], "--html",
                    world["adapter"] / "report.html"), 1, "the page overlaps the input")
    assert inputs_of(world) == before
