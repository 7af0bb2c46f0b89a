"""Many processes, one result: real process groups (gloo on CPU, torch's elastic launcher), bounded by timeouts."""

from __future__ import annotations

import itertools
import re
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


def test_the_launcher_gives_the_signal_handlers_back(tmp_path, monkeypatch):
    """torch's agent installs SignalException handlers and keeps them; after --nproc's launch a SIGTERM must
    reach surgeon's own handler again (the guard's one line), not raise torch's exception."""
    import signal

    from surgeon.cli.parallel import launch_local

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mine = {sig: (lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    before = {sig: signal.signal(sig, handler) for sig, handler in mine.items()}
    try:
        code = launch_local(2, ["spectrum", str(tmp_path / "missing"), "-q"])
        after = {sig: signal.getsignal(sig) for sig in mine}
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert code == 1
    assert after == mine


# -- intruders and scale-intruders ------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_pair(tiny_llama, tmp_path_factory):
    """A real peft LoRA on tiny Llama (B drawn at random so intruders exist), and the merged model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("dist-lora")
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    model.save_pretrained(root / "adapter")
    model.merge_and_unload().save_pretrained(root / "merged", safe_serialization=True)
    return root / "adapter", root / "merged"


@pytest.mark.parametrize("nproc", [2, 3])
def test_intruders_on_several_ranks_equals_one_process(tiny_llama, lora_pair, nproc):
    _, merged = lora_pair
    args = ("intruders", str(merged), "--base", str(tiny_llama), "--json", "-q", "--no-cache")
    solo, multi = run_surgeon(*args), run_surgeon(*args, nproc=nproc)
    assert solo.returncode == 0 and multi.returncode == 0, multi.stderr
    a, b = json.loads(solo.stdout), json.loads(multi.stdout)
    assert b["world_size"] == nproc and a["totals"]["intruders"] > 0
    assert {m["computed_by_rank"] for m in b["matrices"]} == set(range(nproc))
    assert without_timing(a) == without_timing(b)


def test_several_tuned_share_matrices_over_ranks(tiny_llama, lora_pair, tmp_path):
    adapter, merged = lora_pair
    args = ("intruders", str(merged), str(adapter), "--base", str(tiny_llama), "--json", "-q",
            "--cache", str(tmp_path / "cache"))
    multi = run_surgeon(*args, nproc=2)
    assert multi.returncode == 0, multi.stderr
    doc = json.loads(multi.stdout)
    solo = run_surgeon(*args[:-2], "--no-cache")
    assert [m["totals"] for m in doc["models"]] == [m["totals"] for m in json.loads(solo.stdout)["models"]]
    # each changed base matrix decomposed once over both models and both ranks (unchanged ones never)
    analysed = [m["name"] for m in doc["models"][0]["matrices"] if m["status"] == "analysed"]
    assert analysed and doc["cache"]["misses"] == len(analysed)


@pytest.mark.parametrize("nproc", [2, 3])
def test_scale_intruders_output_is_byte_identical(tiny_llama, lora_pair, tmp_path, nproc):
    _, merged = lora_pair
    solo, multi = tmp_path / "solo", tmp_path / "multi"
    args = ("scale-intruders", str(merged), "--base", str(tiny_llama), "--lambda", "0.3", "-q", "--no-cache")
    assert run_surgeon(*args, "-o", str(solo)).returncode == 0
    done = run_surgeon(*args, "-o", str(multi), nproc=nproc)
    assert done.returncode == 0, done.stderr
    assert (solo / "model.safetensors").read_bytes() == (multi / "model.safetensors").read_bytes()
    assert sorted(p.name for p in solo.iterdir()) == sorted(p.name for p in multi.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi", "solo"]  # no staging left


def test_scale_intruders_of_an_adapter_writes_the_merged_rest_identically(tiny_llama, lora_pair, tmp_path):
    adapter, _ = lora_pair
    solo, multi = tmp_path / "solo.safetensors", tmp_path / "multi.safetensors"
    args = ("scale-intruders", str(adapter), "--base", str(tiny_llama), "--lambda", "0", "-q", "--no-cache",
            "--targets", "qv")
    assert run_surgeon(*args, "-o", str(solo)).returncode == 0
    done = run_surgeon(*args, "-o", str(multi), nproc=2)
    assert done.returncode == 0, done.stderr
    assert solo.read_bytes() == multi.read_bytes()


# -- faults -----------------------------------------------------------------------------------------
def _slow_pair(root: Path) -> tuple[Path, Path]:
    """Base and tuned (base + a rank-4 change) with twenty-four 768 × 768 matrices: a few seconds of SVDs."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(768, 768, generator=g) / 30 for i in range(24)}
    tuned = {k: v + torch.randn(768, 4, generator=g) @ torch.randn(4, 768, generator=g) / 10 for k, v in base.items()}
    for name, tensors in (("base", base), ("tuned", tuned)):
        (root / name).mkdir()
        save_file(tensors, root / name / "model.safetensors")
    return root / "base", root / "tuned"


def _pids_of_rank(rank: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"SURGEON_NPROC_CHILD=1" in env and b"scale-intruders" in cmd:
            found.append(int(entry.name))
    return found


def _wait_until_working(proc: subprocess.Popen[str], folder: Path) -> list[int]:
    """Rank 1's pids once the group has formed and the SVDs have begun (rank 0 opens the shared output only
    after every rank joined, so its staging entry is the sign), however slowly the machine starts them."""
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        staged = [p for p in folder.iterdir() if ".surgeon-staging-" in p.name]
        victims = [p for p in _pids_of_rank(1) if p != proc.pid]
        if staged and victims:
            time.sleep(1.0)
            return victims
        time.sleep(0.05)
    raise AssertionError(f"the group never started working: {proc.poll()=}")


def _start_slow_repair(tmp_path: Path, out: Path, *, timeout_s: int) -> tuple[subprocess.Popen[str], list[int]]:
    """`scale-intruders --nproc 2` on the slow pair, and rank 1's pids once the group is working."""
    base, tuned = _slow_pair(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "surgeon", "scale-intruders", str(tuned), "--base", str(base),
                             "--lambda", "0", "-o", str(out), "-q", "--no-cache", "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "SURGEON_DIST_TIMEOUT": str(timeout_s)})
    return proc, _wait_until_working(proc, tmp_path)


def test_a_rank_killed_mid_run_fails_the_run_with_no_output(tmp_path):
    import signal

    out = tmp_path / "repaired"
    proc, victims = _start_slow_repair(tmp_path, out, timeout_s=60)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: rank 1 was killed by SIGKILL"), err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "tuned"]  # no staging, no lock left


@pytest.mark.parametrize("nproc", [2, 3])
def test_extract_lora_adapter_is_byte_identical(tiny_llama, lora_pair, tmp_path, nproc):
    _, merged = lora_pair
    solo, multi = tmp_path / "solo", tmp_path / "multi"
    args = ("extract-lora", str(merged), str(tiny_llama), "-r", "4", "-q", "--json")
    first = run_surgeon(*args, "-o", str(solo))
    done = run_surgeon(*args, "-o", str(multi), nproc=nproc)
    assert first.returncode == 0 and done.returncode == 0, done.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (solo / name).read_bytes() == (multi / name).read_bytes(), name
    a, b = json.loads(first.stdout), json.loads(done.stdout)
    assert {m["computed_by_rank"] for m in b["modules"]} == set(range(nproc))
    assert without_timing(a) | {"output": None, "adapter": None} == without_timing(b) | {"output": None, "adapter": None}


@pytest.mark.parametrize("nproc", [2, 3])
def test_diff_with_rank_statistics_and_adapter_check_equals_one_process(tiny_llama, lora_pair, tmp_path, nproc):
    adapter, merged = lora_pair
    args = ("diff", str(merged), str(tiny_llama), "--adapter", str(adapter), "--json", "-q")
    solo = run_surgeon(*args, "-o", str(tmp_path / "solo"))
    multi = run_surgeon(*args, "-o", str(tmp_path / "multi"), nproc=nproc)
    assert solo.returncode == 0 and multi.returncode == 0, multi.stderr
    a, b = json.loads(solo.stdout), json.loads(multi.stdout)
    assert a["adapter_check"]["equivalent"] and any(t["rank"] for t in a["tensors"])
    assert {t["computed_by_rank"] for t in b["tensors"]} == set(range(nproc))
    assert without_timing(a) | {"output": None} == without_timing(b) | {"output": None}
    names = sorted(p.name for p in (tmp_path / "solo").iterdir() if p.suffix == ".safetensors")
    assert names == sorted(p.name for p in (tmp_path / "multi").iterdir() if p.suffix == ".safetensors")
    for name in names:
        assert (tmp_path / "solo" / name).read_bytes() == (tmp_path / "multi" / name).read_bytes()


@pytest.fixture(scope="module")
def more_adapters(tiny_llama, tmp_path_factory):
    """An OFT adapter (merged module by module with peft's layer code) and a DoRA one (in-memory route)."""
    import torch
    from peft import LoraConfig, OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("dist-adapters")
    for name, config in (("oft", OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "up_proj"],
                                           init_weights=False)),
                         ("dora", LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["v_proj", "down_proj"],
                                             init_lora_weights=False))):
        torch.manual_seed(5)
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(root / name)
    return root


@pytest.mark.parametrize("adapter, dtype, nproc", [("lora", "auto", 2), ("lora", "bf16", 3), ("oft", "auto", 2),
                                                   ("dora", "fp16", 2)])
def test_merge_output_is_byte_identical(tiny_llama, lora_pair, more_adapters, tmp_path, adapter, dtype, nproc):
    path = lora_pair[0] if adapter == "lora" else more_adapters / adapter
    solo, multi = tmp_path / "solo", tmp_path / "multi"
    args = ("merge", str(tiny_llama), str(path), "--dtype", dtype, "-q", "--json")
    first = run_surgeon(*args, "-o", str(solo))
    done = run_surgeon(*args, "-o", str(multi), nproc=nproc)
    assert first.returncode == 0 and done.returncode == 0, done.stderr
    shards = sorted(p.name for p in solo.iterdir() if p.suffix == ".safetensors")
    assert shards and shards == sorted(p.name for p in multi.iterdir() if p.suffix == ".safetensors")
    for name in shards:
        assert (solo / name).read_bytes() == (multi / name).read_bytes(), name
    routes = {e["route"] for e in json.loads(done.stdout)["entries"]}
    assert routes  # the merge computed something on the group
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi", "solo"]


@pytest.mark.parametrize("method, nproc", [("task_arithmetic", 2), ("ties", 3), ("dare_ties", 2)])
def test_apply_output_is_byte_identical(tiny_llama, lora_pair, tmp_path, method, nproc):
    _, merged = lora_pair
    other = tmp_path / "other"
    assert run_surgeon("scale-intruders", str(merged), "--base", str(tiny_llama), "--lambda", "0.5", "-q",
                       "--no-cache", "-o", str(other)).returncode == 0
    solo, multi = tmp_path / "solo", tmp_path / "multi"
    args = ("apply", str(tiny_llama), f"{merged}:0.5", f"{other}:0.7", "--method", method, "--density", "0.5",
            "--seed", "3", "-q")
    assert run_surgeon(*args, "-o", str(solo)).returncode == 0
    done = run_surgeon(*args, "-o", str(multi), nproc=nproc)
    assert done.returncode == 0, done.stderr
    assert (solo / "model.safetensors").read_bytes() == (multi / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def second_lora(tiny_llama, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("dist-lora2")
    torch.manual_seed(7)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                   LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                              init_lora_weights=False)).save_pretrained(root / "b")
    return root / "b"


@pytest.mark.parametrize("method, nproc", [("cat", 2), ("ties_svd", 3), ("dare_ties_svd", 2)])
def test_combine_adapter_is_byte_identical(lora_pair, second_lora, tmp_path, method, nproc):
    solo, multi = tmp_path / "solo", tmp_path / "multi"
    args = ("combine", f"{lora_pair[0]}:0.6", f"{second_lora}:0.4", "--method", method, "--density", "0.5",
            "--svd-rank", "6", "--seed", "1", "-q")
    assert run_surgeon(*args, "-o", str(solo)).returncode == 0
    done = run_surgeon(*args, "-o", str(multi), nproc=nproc)
    assert done.returncode == 0, done.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (solo / name).read_bytes() == (multi / name).read_bytes(), name


def test_a_rank_that_hangs_fails_the_run_after_the_timeout(tmp_path):
    import signal

    out = tmp_path / "repaired"
    proc, victims = _start_slow_repair(tmp_path, out, timeout_s=20)
    for pid in victims:
        os.kill(pid, signal.SIGSTOP)  # alive but silent: only the collective timeout can notice
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "hung past the collective timeout (SURGEON_DIST_TIMEOUT=20 s)" in lines[0], err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "tuned"]


def test_a_rank_that_raises_names_itself_and_the_tensor(tmp_path):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(64, 48, generator=g) for i in range(6)}
    tuned = {k: v + 0.1 * torch.randn(64, 48, generator=g) for k, v in base.items()}
    tuned["model.layers.3.mlp.up_proj.weight"][5, 7] = float("nan")
    for name, tensors in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    done = run_surgeon("intruders", str(tmp_path / "tuned"), "--base", str(tmp_path / "base"), "--no-cache", nproc=2)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert re.match(r"Error: rank [01] failed on model\.layers\.3\.mlp\.up_proj\.weight: .*(NaN|non-finite)", lines[0]), lines
