"""Merge a rank-16 LoRA on all seven projections (or, with --adapter oft, an OFT adapter with 32-wide
blocks on the four attention projections: the per-module route through peft's layer code) into the
~1.1B-parameter bf16 Llama-shaped checkpoint: `surgeon merge` vs peft (load + merge_and_unload +
save_pretrained) vs `cp -r`.

Prints, side by side in one run, the wall time, CPU time and peak RSS of each (median / max over
--repeat runs, contenders interleaved, page cache warmed and dirty pages synced the same way
before each), the ratios against the targets (surgeon <= 1.5x cp, <= 0.5x peft, peak RSS <= 1 GB),
and checks that surgeon's merged tensors equal peft's bit for bit on a sample.

Two wall times per contender, from one run: "exit" (the command returns) and "durable" (its
output is also on disk: every output file fsynced right after it exits). surgeon fsyncs its
output before it returns (its rename into place is crash-safe), cp and peft leave gigabytes of
dirty pages for the kernel to write later, so "durable" compares the same guarantee.

    python benchmarks/merge_vs_peft.py [--workdir /tmp/surgeon-bench] [--repeat 2] [--scale 1.0] [--adapter oft]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import warm_cache  # noqa: E402
from benchmarks._models import build_llama_checkpoint, build_lora_adapter  # noqa: E402
from benchmarks._peft_adapters import build_oft_adapter  # noqa: E402

OFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


_WRAPPER = """
import json, os, resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t = time.perf_counter()
rc = subprocess.run(cmd).returncode
exited = time.perf_counter() - t
u = resource.getrusage(resource.RUSAGE_CHILDREN)
if rc == 0 and out:  # the same guarantee for everyone: every output file on disk
    for root, _, files in os.walk(out):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
durable = time.perf_counter() - t
print(json.dumps({"rc": rc, "wall": exited, "durable": durable, "rss_kb": u.ru_maxrss, "cpu": u.ru_utime + u.ru_stime}))
"""


def measure(cmd: list[str], out: Path | None = None) -> tuple[float, float, float, float]:
    """(wall seconds to exit, wall seconds until ``out`` is on disk, peak RSS MB, CPU seconds user+sys) of
    ``cmd`` in a child process."""
    done = subprocess.run([sys.executable, "-c", _WRAPPER, str(out or ""), *cmd], capture_output=True, text=True,
                          check=False)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd} exited {result['rc']}:\n{done.stderr[-2000:]}")
    return result["wall"], result["durable"], result["rss_kb"] / 1024, result["cpu"]


def contenders(model: Path, adapter: Path, workdir: Path) -> dict[str, tuple[list[str], Path]]:
    return {
        "cp -r": (["cp", "-r", str(model), str(workdir / "merge-out-cp")], workdir / "merge-out-cp"),
        "surgeon merge": ([sys.executable, "-m", "surgeon", "-q", "merge", str(model), str(adapter),
                           "-o", str(workdir / "merge-out-surgeon")], workdir / "merge-out-surgeon"),
        "peft": ([sys.executable, "-c", PEFT_MERGE, str(model), str(adapter), str(workdir / "merge-out-peft")],
                 workdir / "merge-out-peft"),
    }


def same_as_peft(surgeon_out: Path, peft_out: Path, sample: int = 12, only: tuple[str, ...] = ("proj",)
                 ) -> tuple[int, int]:
    """(tensors compared, tensors bit-identical) on a sample spread over the tensors named with one of ``only``."""
    from surgeon.io.checkpoint import Checkpoint

    with Checkpoint.open(surgeon_out) as ours, Checkpoint.open(peft_out) as theirs:
        names = [n for n in ours.keys() if any(o in n for o in only)]
        picked = names[:: max(1, len(names) // sample)][:sample] + ["model.embed_tokens.weight"]
        equal = sum(ours.read_raw(n) == theirs.read_raw(n) for n in picked)
        return len(picked), equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/surgeon-bench")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="model size relative to 1.1B (for a quick try)")
    parser.add_argument("--adapter", choices=("lora", "oft"), default="lora",
                        help="lora: r=16 on 7 projections (fast path); oft: 32-wide blocks on q/k/v/o (peft's layer code)")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    label = "llama-1.1b" if args.scale == 1.0 else f"llama-x{args.scale:g}"
    model = build_llama_checkpoint(workdir / label, scale=args.scale)
    if args.adapter == "oft":
        adapter = build_oft_adapter(model, workdir / f"{label}-oft32", block_size=32, targets=OFT_TARGETS)
        what = f"OFT (32-wide blocks) on {len(OFT_TARGETS)} attention projections"
    else:
        adapter = build_lora_adapter(model, workdir / f"{label}-lora16", rank=16)
        what = "LoRA r=16 on 7 projections"
    runs = contenders(model, adapter, workdir)
    times: dict[str, list[float]] = {k: [] for k in runs}
    durable: dict[str, list[float]] = {k: [] for k in runs}
    rss: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.repeat):
        for label, (cmd, out) in runs.items():
            shutil.rmtree(out, ignore_errors=True)
            warm_cache(str(model))
            os.sync()  # each contender starts with no dirty pages of the one before being written back
            wall, synced, peak, seconds = measure(cmd, out)
            times[label].append(wall)
            durable[label].append(synced)
            rss[label].append(peak)
            cpu[label].append(seconds)
            if i < args.repeat - 1 or label == "cp -r":
                shutil.rmtree(out, ignore_errors=True)
    startup = min(measure([sys.executable, "-c", "import torch"])[0] for _ in range(3))
    from surgeon.ops import native_merge

    kernel = "native kernel" if native_merge.kernel() is not None else f"torch (no native kernel: {native_merge.build_error()})"
    oft = args.adapter == "oft"  # OFT: every targeted tensor; LoRA: a sample of the projections
    compared, equal = same_as_peft(runs["surgeon merge"][1], runs["peft"][1], sample=10**6 if oft else 12,
                                   only=OFT_TARGETS if oft else ("proj",))
    for _, out in runs.values():
        shutil.rmtree(out, ignore_errors=True)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9
    load = os.getloadavg()[0]
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    print(f"model: {size:.2f} GB bf16, 3 shards; {what} x {layers} layers; "
          f"{os.cpu_count()} CPUs, load average {load:.1f}; median of {args.repeat}")
    print(f"surgeon's CPU merge path: {kernel if args.adapter == 'lora' else 'OFT block by block (ops/oft.py), module by module'}")
    print(f"{'contender':<14} {'exit s':>8} {'x cp':>6} {'durable s':>10} {'x cp':>6} {'CPU s':>7} {'peak RSS MB':>12}")
    med = lambda d, k: statistics.median(d[k])  # noqa: E731
    cp, cp_durable = med(times, "cp -r"), med(durable, "cp -r")
    for label in runs:
        wall, synced = med(times, label), med(durable, label)
        print(f"{label:<14} {wall:8.2f} {wall / cp:6.2f} {synced:10.2f} {synced / cp_durable:6.2f} "
              f"{med(cpu, label):7.2f} {max(rss[label]):12.0f}")
    ours, peft = med(times, "surgeon merge"), med(times, "peft")
    ours_d, peft_d = med(durable, "surgeon merge"), med(durable, "peft")
    print(f"\nsurgeon / cp:   {ours_d / cp_durable:.2f}x with every output on disk (target <= 1.5x); "
          f"{ours / cp:.2f}x to exit (surgeon's exit includes its fsync, cp's does not)")
    print(f"surgeon / peft: {ours_d / peft_d:.2f}x on disk, {ours / peft:.2f}x to exit (target <= 0.5x)")
    print(f"surgeon peak RSS: {max(rss['surgeon merge']):.0f} MB  (target <= 1024 MB); peft: {max(rss['peft']):.0f} MB")
    print(f"bit-identical to peft's merge: {equal}/{compared} sampled tensors")
    print(f"python + `import torch` alone: {startup:.2f} s = {startup / cp:.2f}x cp's exit (peft pays it; surgeon's "
          "CPU LoRA merge does not import torch)")


if __name__ == "__main__":
    main()
