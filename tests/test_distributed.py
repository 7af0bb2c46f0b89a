"""Many processes, one result: real process groups (gloo on CPU, torch's elastic launcher), bounded by timeouts."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from surgeon.errors import DistributedError
from surgeon.parallel.share import loads, share, svd_cost
from surgeon.parallel.world import SOLO, detect

TIMEOUT_S = 240
TIMING = {"seconds", "world_size", "computed_by_rank", "wall_time_s"}


def run_surgeon(*args: str, nproc: int | None = None, env: dict[str, str] | None = None,
                timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    extra = ["--nproc", str(nproc)] if nproc else []
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "SURGEON_DIST_TIMEOUT": "120", **(env or {})}
    return subprocess.run([sys.executable, "-m", "surgeon", *args, *extra], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def without_timing(doc):
    """The document with the fields that may differ between runs of different world sizes removed."""
    if isinstance(doc, dict):
        return {k: without_timing(v) for k, v in doc.items() if k not in TIMING}
    if isinstance(doc, list):
        return [without_timing(v) for v in doc]
    return doc


# -- sharing (pure) ---------------------------------------------------------------------------------
def test_one_rank_owns_everything():
    assert share([3.0, 1.0, 2.0], 1) == [0, 0, 0]


def test_sharing_is_deterministic_and_uses_every_rank():
    costs = [svd_cost(m, n) for m, n in [(2048, 2048), (2048, 5632), (5632, 2048), (256, 2048), (2048, 256)] * 3]
    assert share(costs, 3) == share(list(costs), 3)
    assert set(share(costs, 3)) == {0, 1, 2}


@pytest.mark.parametrize("seed", range(5))
def test_sharing_finishes_within_four_thirds_of_the_best_split(seed):
    import random

    rng = random.Random(seed)
    costs = [rng.uniform(1, 100) for _ in range(9)]
    best = min(max(loads(costs, list(owners), 2)) for owners in itertools.product(range(2), repeat=len(costs)))
    assert max(loads(costs, share(costs, 2), 2)) <= best * 4 / 3 + 1e-9


def test_svd_cost_is_m_n_min():
    assert svd_cost(3, 5) == 3 * 5 * 3


def test_the_world_comes_from_the_environment():
    assert detect({}) is SOLO
    assert detect({"WORLD_SIZE": "1", "RANK": "0"}) is SOLO
    w = detect({"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "1"}, cuda=False)
    assert (w.rank, w.size, w.local_rank, w.backend, w.device, w.is_main) == (2, 3, 1, "gloo", "cpu", False)
    g = detect({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, cuda=True)
    assert (g.backend, g.device) == ("nccl", "cuda:1")


@pytest.mark.parametrize("env, text", [
    ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5 is outside WORLD_SIZE=2"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two'"),
])
def test_a_wrong_environment_is_one_clear_error(env, text):
    with pytest.raises(DistributedError, match=text):
        detect(env, cuda=False)


# -- whole commands on 2 and 3 ranks ----------------------------------------------------------------
@pytest.fixture(scope="module")
def spectrum_solo(tiny_llama):
    done = run_surgeon("spectrum", str(tiny_llama), "--top-k", "4", "--json", "-q")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("nproc", [2, 3])
def test_spectrum_on_several_ranks_equals_one_process(tiny_llama, spectrum_solo, nproc):
    done = run_surgeon("spectrum", str(tiny_llama), "--top-k", "4", "--json", "-q", nproc=nproc)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)  # one document: only rank 0 printed
    assert doc["world_size"] == nproc and spectrum_solo["world_size"] == 1
    ranks = [m["computed_by_rank"] for m in doc["matrices"]]
    assert set(ranks) == set(range(nproc))
    assert without_timing(doc) == without_timing(spectrum_solo)


def test_spectrum_full_writes_one_file_identical_to_one_process(tiny_llama, tmp_path):
    solo, multi = tmp_path / "solo.safetensors", tmp_path / "multi.safetensors"
    assert run_surgeon("spectrum", str(tiny_llama), "--full", "-o", str(solo), "-q").returncode == 0
    done = run_surgeon("spectrum", str(tiny_llama), "--full", "-o", str(multi), "-q", nproc=2)
    assert done.returncode == 0, done.stderr
    from safetensors import safe_open

    with safe_open(solo, "pt") as a, safe_open(multi, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert a.get_tensor(key).equal(b.get_tensor(key)), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.safetensors", "solo.safetensors"]


def test_an_error_on_every_rank_is_said_once(tmp_path):
    done = run_surgeon("spectrum", str(tmp_path / "missing"), nproc=2)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"Error: {tmp_path / 'missing'}: no such file or folder; check the path."]
