"""`surgeon merge --dry-run`: the route plan (every tensor, what happens to it, by which route, bytes out),
made before anything runs, printed without writing; the real merge then follows exactly that plan."""

from __future__ import annotations

import json

import peft
import torch
from click.testing import CliRunner

from _merge_helpers import cast_base, make_adapter
from surgeon.cli.main import cli
from surgeon.io.checkpoint import Checkpoint
from surgeon.workflows.merge.run import merge


def test_dry_run_writes_nothing_and_lists_every_tensor(tiny_llama, tmp_path):
    adapter = make_adapter(tiny_llama, tmp_path / "adapter",
                           peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(tiny_llama), str(adapter), "-o", str(out), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert not out.exists()
    payload = json.loads(result.stdout)
    with Checkpoint.open(tiny_llama) as ckpt:
        names = ckpt.keys()
        sizes = {n: ckpt.info(n).nbytes for n in names}
    rows = {t["name"]: t for t in payload["tensors"]}
    assert list(rows) == names
    q = [n for n in names if "q_proj" in n]
    assert q and all(rows[n]["action"] == "merge" and rows[n]["operations"] == "lora(a0)" for n in q)
    assert all(rows[n]["action"] == "replace" for n in names if n.startswith("lm_head"))
    assert all(rows[n]["action"] == "copy" for n in names if "q_proj" not in n and not n.startswith("lm_head"))
    assert {rows[n]["nbytes"] for n in names} == {sizes[n] for n in names}  # same dtype: same bytes
    assert payload["bytes_out"] == sum(sizes.values())
    text = CliRunner().invoke(cli, ["merge", str(tiny_llama), str(adapter), "-o", str(out), "--dry-run"])
    assert text.exit_code == 0 and not out.exists()
    assert all(n in text.stdout for n in names)


def test_the_merge_follows_the_planned_routes(tiny_llama, tmp_path):
    """bf16 base to fp32: routes and bytes out as planned; DoRA goes in memory, LoRA streams."""
    base = cast_base(tiny_llama, tmp_path / "bf16", torch.bfloat16)
    lora = make_adapter(tiny_llama, tmp_path / "lora", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    dora = make_adapter(tiny_llama, tmp_path / "dora", peft.LoraConfig(r=4, target_modules=["v_proj"], use_dora=True))
    for engine in ("torch", "memory"):
        plan = merge(base, [lora, dora], tmp_path / f"out-{engine}", dtype="fp32", dry_run=True, engine=engine)
        assert not (tmp_path / f"out-{engine}").exists()
        report = merge(base, [lora, dora], tmp_path / f"out-{engine}", dtype="fp32", engine=engine)
        planned = {t.name: t.route for t in plan.routes.tensors if t.action in ("merge", "replace", "cast")}
        assert {e.name: e.route for e in report.entries} == planned
        assert report.bytes_written == plan.routes.bytes_out
        with Checkpoint.open(tmp_path / f"out-{engine}") as ckpt:
            assert sum(ckpt.info(n).nbytes for n in ckpt.keys()) == plan.routes.bytes_out
        routes = set(planned.values())
        assert routes == ({"stream", "memory", "cast"} if engine == "torch" else {"memory", "cast"}), routes


def test_merge_leaves_gc_and_torch_threads_as_they_were(tiny_llama, tmp_path):
    """The merge loop pauses the garbage collector and runs torch on one thread; both come back after it,
    also when the merge fails halfway."""
    import gc

    lora = make_adapter(tiny_llama, tmp_path / "lora", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert gc.isenabled()
        merge(tiny_llama, [lora], tmp_path / "out", engine="torch")
        assert gc.isenabled() and torch.get_num_threads() == 2
        oft = make_adapter(tiny_llama, tmp_path / "oft", peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj"]))
        (oft / "adapter_model.safetensors").write_bytes((lora / "adapter_model.safetensors").read_bytes())
        try:  # LoRA tensors under an OFT config: peft builds no OFT layer with them, mid-merge
            merge(tiny_llama, [oft], tmp_path / "bad", engine="torch")
        except Exception as exc:  # noqa: BLE001 - any refusal will do; what matters is what it leaves behind
            assert "OFT" in str(exc)
        else:
            raise AssertionError("an OFT config over LoRA tensors was merged")
        assert gc.isenabled() and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
