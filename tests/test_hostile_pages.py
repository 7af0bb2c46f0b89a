"""Issue 15, side outputs: the `--html` pages of intruders, scale-intruders and spectrum, and `--plot`
folders, follow the rules of every output: never into an input (nor into the command's own output),
never over a file without --overwrite, atomic, and checked before the main output is published."""

from __future__ import annotations

import pytest

from _hostile_helpers import digest, inputs_of, invoke, leftovers, one_line, tmpfs, world  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _matplotlib():
    pytest.importorskip("matplotlib")


def scale(world, out, *extra):
    return invoke("scale-intruders", world["merged"], "--base", world["base"], "--lambda", "0", "--epsilon", "0.9",
                  "-o", out, *extra)


def test_scale_page_into_an_input_fails_before_the_checkpoint(world, tmp_path):  # noqa: F811
    before = inputs_of(world)
    for page in (world["base"] / "report.html", world["merged"] / "config.json"):
        out = tmp_path / "fixed"
        one_line(scale(world, out, "--html", page, "--overwrite"), 1, "the page overlaps the input")
        assert not out.exists()
    assert inputs_of(world) == before and leftovers(tmp_path) == []


def test_scale_page_inside_its_own_output_is_refused(world, tmp_path):  # noqa: F811
    out = tmp_path / "fixed"
    for page in (out / "report.html", out):
        one_line(scale(world, out, "--html", page), 1, "the page would be written into the output", "outside it")
        assert not out.exists()


def test_existing_scale_page_needs_overwrite_and_is_checked_first(world, tmp_path):  # noqa: F811
    page, out = tmp_path / "r.html", tmp_path / "fixed"
    page.write_text("mine\n")
    one_line(scale(world, out, "--html", page), 1, f"{page}: the page file exists; choose another or pass --overwrite")
    assert not out.exists() and page.read_text() == "mine\n"
    result = scale(world, out, "--html", page, "--overwrite")
    assert result.exit_code == 0, result.output
    assert page.read_text().startswith("<!DOCTYPE html>") and out.is_dir()
    assert leftovers(tmp_path) == []


def test_scale_page_on_a_read_only_disk_fails_before_the_checkpoint(world, tmp_path):  # noqa: F811
    with tmpfs("1m", read_only=True) as ro:
        out = tmp_path / "fixed"
        one_line(scale(world, out, "--html", ro / "r.html"), 1, "read-only")
        assert not out.exists()


def test_intruders_page_into_a_tuned_input_or_over_a_file(world, tmp_path):  # noqa: F811
    before = inputs_of(world)
    one_line(invoke("intruders", world["merged"], "--base", world["base"], "--html", world["merged"] / "r.html"), 1,
             "the page overlaps the input")
    one_line(invoke("intruders", world["merged"], world["adapter"], "--base", world["base"], "--html",
                    world["adapter"] / "r.html"), 1, "the page overlaps the input")
    page = tmp_path / "r.html"
    page.write_text("mine\n")
    one_line(invoke("intruders", world["merged"], "--base", world["base"], "--html", page), 1,
             f"{page}: the page file exists; choose another or pass --overwrite")
    assert page.read_text() == "mine\n"
    result = invoke("intruders", world["merged"], "--base", world["base"], "--html", page, "--overwrite")
    assert result.exit_code == 0, result.output
    assert page.read_text().startswith("<!DOCTYPE html>") and leftovers(tmp_path) == []
    assert inputs_of(world) == before and not (world["merged"] / "r.html").exists()


def test_intruders_plot_subfolder_of_several_tuned_into_an_input(world, tmp_path):  # noqa: F811
    # with several TUNED, model i's figures go to PLOT/<i>-<name>: here model 2's folder is TUNED 1
    before = inputs_of(world)
    plot, other = tmp_path / "plot", tmp_path / "other"
    plot.mkdir()
    other.mkdir()
    (plot / "2-m").symlink_to(world["merged"], target_is_directory=True)
    (other / "m").symlink_to(world["merged"], target_is_directory=True)
    one_line(invoke("intruders", plot / "2-m", other / "m", "--base", world["base"], "--plot", plot), 1,
             "the plot folder overlaps the input")
    assert inputs_of(world) == before and sorted(p.name for p in plot.iterdir()) == ["2-m"]  # nothing drawn first


def test_spectrum_page_and_its_output_file_cannot_be_one(world, tmp_path):  # noqa: F811
    target = tmp_path / "s.json"
    one_line(invoke("spectrum", world["base"], "-o", target, "--html", target), 1,
             "the page would be written into the output")
    assert not target.exists()
    page = tmp_path / "s.html"
    page.write_text("mine\n")
    one_line(invoke("spectrum", world["base"], "--html", page), 1, "the page file exists")
    assert page.read_text() == "mine\n"
    result = invoke("spectrum", world["base"], "--html", page, "--overwrite")
    assert result.exit_code == 0, result.output
    assert page.read_text().startswith("<!DOCTYPE html>") and leftovers(tmp_path) == []


@pytest.mark.parametrize("args,message", [
    (["intruders", "{merged}", "--base", "{base}", "--cache", "{base}"], "the SVD cache folder overlaps the input"),
    (["intruders", "{merged}", "--base", "{base}", "--cache", "{merged}/cache"], "the SVD cache folder overlaps the input"),
    (["spectrum", "{base}", "--full", "--cache", "{base}"], "the SVD cache folder overlaps the input"),
    (["scale-intruders", "{merged}", "--base", "{base}", "--lambda", "0", "-o", "{out}", "--cache", "{out}/c"],
     "the SVD cache folder overlaps the output"),
])
def test_the_svd_cache_is_a_side_output_too(world, tmp_path, args, message):  # noqa: F811
    before = inputs_of(world)
    out = tmp_path / "fixed"
    paths = {"base": world["base"], "merged": world["merged"], "out": out}
    one_line(invoke(*[a.format(**paths) for a in args]), 1, message)
    assert inputs_of(world) == before and not out.exists()


def test_a_cache_beside_the_output_still_works(world, tmp_path):  # noqa: F811
    result = invoke("scale-intruders", world["merged"], "--base", world["base"], "--lambda", "0", "-o",
                    tmp_path / "fixed", "--cache", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fixed").is_dir() and any((tmp_path / "cache").iterdir())
