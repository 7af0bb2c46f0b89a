"""`surgeon intruders --sequence`: planted intruders through three synthetic stages, checked by hand.

Stage 1 plants X and Z on the base, stage 2 adds Y, stage 3 removes Z. The expected
births, persistence and vanishing are set by hand from that construction; the counts
are checked against the dense reference (full float64 SVDs of base and tuned).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from _spectral_helpers import geometric_matrix, reference_cosines, save_matrices
from surgeon.cli.main import cli
from surgeon.workflows.spectral.intruders import find_intruders
from surgeon.workflows.spectral.sequence import find_intruders_sequence, match_pairs

NAME = "model.layers.0.mlp.proj.weight"
OTHER = "model.layers.1.mlp.proj.weight"


def _unit(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, generator=gen, dtype=torch.float64), dim=0)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequence")
    w0 = geometric_matrix(150, 100, decay=0.85)
    w1 = geometric_matrix(150, 100, decay=0.85, seed=3)  # a second matrix, never planted on
    gen = torch.Generator().manual_seed(7)
    x, z, y = ((_unit(150, gen), _unit(100, gen)) for _ in range(3))
    plant = lambda *pairs: w0 + sum(s * torch.outer(a, b) for s, (a, b) in pairs)  # noqa: E731
    weights = [plant((4.0, x), (3.0, z)), plant((4.0, x), (3.0, z), (2.5, y)), plant((4.0, x), (2.5, y))]
    base = save_matrices(root / "base.safetensors", {NAME: w0, OTHER: w1}, dtype=torch.float64)
    paths = [save_matrices(root / f"stage{i}.safetensors", {NAME: w, OTHER: w1}, dtype=torch.float64)
             for i, w in enumerate(weights, 1)]
    return base, paths, w0, weights, (x[0], z[0], y[0])


def _which(u: torch.Tensor, planted: tuple[torch.Tensor, ...]) -> str:
    """The planted direction (x, z or y) a singular vector is, by the largest |cos|."""
    cos = [abs(float(u @ p)) for p in planted]
    return "xzy"[max(range(3), key=cos.__getitem__)]


def test_births_persistence_and_vanishing(stages, tmp_path):
    base, paths, w0, weights, planted = stages
    report = find_intruders_sequence(paths, base, targets="proj", cache=tmp_path / "cache")
    view = report.sequence
    by_stage = []
    for s, w in zip(view.stages, weights):
        ut = torch.linalg.svd(w, full_matrices=False)[0]
        by_stage.append({_which(ut[:, i.rank - 1], planted): i.born for i in s.items})
    assert by_stage == [{"x": 1, "z": 1}, {"x": 1, "z": 1, "y": 2}, {"x": 1, "y": 2}]
    assert [(s.intruders, s.new, s.persisting, s.vanished, s.cumulative) for s in view.stages] == [
        (2, 2, 0, 0, 2), (3, 1, 2, 0, 3), (2, 0, 2, 1, 3)]
    (gone,) = view.stages[2].gone
    assert gone.born == 1 and gone.matrix == NAME
    ut2 = torch.linalg.svd(weights[1], full_matrices=False)[0]
    assert _which(ut2[:, gone.rank - 1], planted) == "z"  # the rank it had at stage 2
    # the ε at which each stops counting is its c_j, from the dense reference
    for s, w in zip(view.stages, weights):
        ref, _ = reference_cosines(w0, w, 10)
        for item in s.items:
            assert item.stops_at_epsilon == pytest.approx(ref[item.rank - 1], abs=1e-4)
    assert view.stages[0].born == {"1": 2} and view.stages[2].born == {"1": 1, "2": 1}


def test_counts_equal_separate_runs_and_base_decomposed_once(stages, tmp_path):
    base, paths, w0, weights, _ = stages
    report = find_intruders_sequence(paths, base, targets="proj", cache=tmp_path / "cache")
    for path, model, w in zip(paths, report.models, weights):
        alone = find_intruders(path, base, targets="proj", use_cache=False)
        assert [m.intruders for m in model.matrices] == [m.intruders for m in alone.matrices]
        assert model.totals == alone.totals
        ref, _ = reference_cosines(w0, w, 10)
        assert model.matrices[0].intruders == [j + 1 for j, c in enumerate(ref) if c < 0.5]
    # only NAME changed: one base matrix, decomposed once (one cache file), reused by stages 2 and 3
    assert report.cache["misses"] == 1 and report.cache["hits"] == 2
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1


def test_match_pairs_is_one_to_one_and_thresholded():
    e = torch.eye(4, dtype=torch.float64)
    prev = torch.stack([e[0], e[1]], 1)
    cur = torch.stack([e[1], 0.95 * e[0] + 0.312 * e[2], e[3]], 1)
    assert [(i, j) for i, j, _ in match_pairs(prev, cur, 0.9)] == [(1, 0), (0, 1)]
    assert match_pairs(prev, cur, 0.96) == [(1, 0, 1.0)]


def test_cli_sequence_json_and_text(stages, tmp_path):
    base, paths, *_ = stages
    runner = CliRunner()
    args = ["intruders", *map(str, paths), "--base", str(base), "--targets", "proj", "--no-cache", "--sequence"]
    result = runner.invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert [m["totals"]["intruders"] for m in body["models"]] == [2, 3, 2]
    assert [s["new"] for s in body["sequence"]["stages"]] == [2, 1, 0]
    assert body["cache"]["misses"] == 1 and body["cache"]["dir"] is None
    text = runner.invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "persisting" in text.output and "vanished" in text.output
    one = runner.invoke(cli, ["intruders", str(paths[0]), "--base", str(base), "--targets", "proj", "--sequence"])
    assert one.exit_code != 0 and "at least two stages" in one.output


def test_scale_sequence_from_rescales_only_the_later_born(stages, tmp_path):
    base, paths, w0, weights, planted = stages
    out = tmp_path / "fixed"
    result = CliRunner().invoke(cli, ["scale-intruders", *map(str, paths), "--base", str(base), "--targets", "proj",
                                      "--no-cache", "--sequence-from", "2", "--lambda", "0", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["sequence_from"] == 2 and [len(c["ranks"]) for c in body["changes"]] == [1]
    # reference: stage 3's full SVD with the y triplet (born at stage 2) removed; x (born at 1) kept
    u, s, vh = torch.linalg.svd(weights[2], full_matrices=False)
    j = max(range(3), key=lambda i: abs(float(u[:, i] @ planted[2])))
    expected = weights[2] - s[j] * torch.outer(u[:, j], vh[j])
    from surgeon.io.checkpoint import Checkpoint

    with Checkpoint.open(out) as ckpt:
        written = ckpt.get(NAME, dtype=torch.float64)
        assert torch.equal(ckpt.get(OTHER, dtype=torch.float64), geometric_matrix(150, 100, decay=0.85, seed=3))
    assert torch.allclose(written, expected, atol=1e-6)
    after = find_intruders(out, base, targets="proj", use_cache=False)
    assert after.totals["intruders"] == 1  # x remains
    bad = CliRunner().invoke(cli, ["scale-intruders", *map(str, paths), "--base", str(base), "--sequence-from", "4",
                                   "--lambda", "0", "-o", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "from 1 to 3" in bad.output
    two = CliRunner().invoke(cli, ["scale-intruders", *map(str, paths[:2]), "--base", str(base), "--lambda", "0",
                                   "-o", str(tmp_path / "y")])
    assert two.exit_code != 0 and "--sequence-from" in two.output
