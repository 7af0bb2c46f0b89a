"""Combining on the ~1.1B-parameter bf16 Llama-shaped checkpoint, side by side in one run:

1. `surgeon apply --method ties` of two fine-tunes vs `mergekit-yaml` of the same config (mergekit 0.1.5
   computing in float32 and writing bf16, as surgeon does);
2. `surgeon combine --method svd` of two rank-16 LoRAs vs peft's add_weighted_adapter(combination_type="svd")
   (load the model, add both adapters, combine, save the new adapter).

Prints wall time and peak RSS of each, the ratios against the targets (surgeon apply <= 0.2x mergekit's wall,
<= 1 GB peak RSS), the load average, and how far surgeon's tensors are from the peer's on a sample.

    python benchmarks/combine_vs_peers.py [--workdir /work/bench-cache] [--scale 1.0] [--density 0.5]

mergekit is found as $SURGEON_MERGEKIT_PYTHON's venv (default /work/venvs/mergekit; see .ci/run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import measure, warm_cache  # noqa: E402
from benchmarks._models import build_llama_checkpoint, build_lora_adapter  # noqa: E402
from surgeon.io.checkpoint import Checkpoint  # noqa: E402
from surgeon.io.writer import CheckpointWriter, TensorSpec  # noqa: E402

PEFT_SVD = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, a, b, out = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, a, adapter_name="a")
model.load_adapter(b, adapter_name="b")
model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="svd", svd_rank=16)
model.save_pretrained(out, selected_adapters=["mix"])
"""


def build_finetune(base: Path, out: Path, *, seed: int, scale: float = 1e-3) -> Path:
    """A 'fine-tune' of ``base``: every tensor moved by scale·N(0, 1), same shards, streamed (cached by spec)."""
    spec = {"base": str(base.resolve()), "seed": seed, "scale": scale,
            "base_spec": json.loads((base / "bench_spec.json").read_text())}
    marker = out / "bench_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    gen = torch.Generator().manual_seed(seed)
    with Checkpoint.open(base) as ckpt:
        specs = [TensorSpec(n, ckpt.info(n).dtype, ckpt.info(n).shape) for n in ckpt.keys()]
        shard = max(s.nbytes for s in specs) + ckpt.total_bytes // 3
        with CheckpointWriter(out, specs, max_shard_size=shard, overwrite=True,
                              extra_texts={"config.json": (base / "config.json").read_text()}) as writer:
            for name in ckpt.keys():
                t = ckpt.get(name)
                writer.write(name, (t.float() + scale * torch.randn(t.shape, generator=gen)).to(t.dtype))
    marker.write_text(json.dumps(spec))
    return out


def mergekit_bin() -> Path | None:
    python = Path(os.environ.get("SURGEON_MERGEKIT_PYTHON", "/work/venvs/mergekit/bin/python"))
    candidate = python.parent / "mergekit-yaml"
    return candidate if candidate.is_file() else None


def max_rel_diff(a: Path, b: Path, names: list[str] | None = None, sample: int = 12) -> float:
    """Largest max|a − b| / max|b| over a sample of tensors present in both."""
    worst = 0.0
    with Checkpoint.open(a) as x, Checkpoint.open(b) as y:
        common = [n for n in (names or x.keys()) if n in y]
        step = max(1, len(common) // sample)
        for name in common[::step]:
            u, v = x.get(name, dtype=torch.float64), y.get(name, dtype=torch.float64)
            worst = max(worst, float((u - v).abs().max() / v.abs().max().clamp(min=1e-30)))
    return worst


def lora_products_diff(ours: Path, theirs: Path, sample: int = 8) -> float:
    """max relative difference of B·A (scaling 1 on both sides: r = lora_alpha) over a sample of modules."""
    from safetensors.torch import load_file

    x, y = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    keys = sorted(k for k in x if k.endswith("lora_A.weight"))
    worst = 0.0
    for key in keys[:: max(1, len(keys) // sample)]:
        bkey = key.replace("lora_A", "lora_B")
        p, q = x[bkey].double() @ x[key].double(), y[bkey].double() @ y[key].double()
        worst = max(worst, float((p - q).abs().max() / q.abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/work/bench-cache")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--part", choices=["all", "apply", "svd"], default="all",
                        help="run only the apply-vs-mergekit or the combine-vs-peft half")
    args = parser.parse_args()
    work = Path(args.workdir)
    label = "llama-1.1b" if args.scale == 1.0 else f"llama-x{args.scale:g}"
    base = build_llama_checkpoint(work / label, scale=args.scale)
    fts = [build_finetune(base, work / f"{label}-ft{i}", seed=10 + i) for i in (1, 2)]
    loras = [build_lora_adapter(base, work / f"{label}-lora16-s{i}", rank=16, seed=i) for i in (1, 2)]
    runs = work / f"combine-bench-out-{args.part}"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    rows: list[tuple[str, float, float]] = []

    def record(name: str, result: tuple[float, float]) -> None:
        rows.append((name, *result))
        print(f"  {name}: {result[0]:.2f} s, {result[1]:.0f} MB", flush=True)  # as it happens: runs are long

    surgeon = [sys.executable, "-m", "surgeon", "-q"]
    if args.part in ("all", "apply"):
        cmd = surgeon + ["apply", str(base), f"{fts[0]}:1.0", f"{fts[1]}:0.5", "--method", "ties", "--density",
                         str(args.density), "-o", str(runs / "surgeon-ties")]
        for path in (base, *fts):
            warm_cache(str(path))
        record("surgeon apply ties", measure(cmd))
        tool = mergekit_bin()
        if tool is not None:
            config = {"merge_method": "ties", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
                      "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0, "density": args.density}},
                                 {"model": str(fts[1]), "parameters": {"weight": 0.5, "density": args.density}}]}
            (runs / "ties.yml").write_text(json.dumps(config))
            for path in (base, *fts):
                warm_cache(str(path))
            record("mergekit-yaml ties", measure([str(tool), str(runs / "ties.yml"), str(runs / "mergekit-ties"),
                                                  "--no-copy-tokenizer", "--no-write-model-card"]))
    if args.part in ("all", "svd"):
        cmd = surgeon + ["combine", f"{loras[0]}:0.7", f"{loras[1]}:0.3", "--method", "svd", "--svd-rank", "16",
                         "-o", str(runs / "surgeon-svd")]
        record("surgeon combine svd", measure(cmd))
        (runs / "peft_svd.py").write_text(PEFT_SVD)
        record("peft add_weighted svd", measure([sys.executable, str(runs / "peft_svd.py"), str(base),
                                                 str(loras[0]), str(loras[1]), str(runs / "peft-svd")]))
    load = os.getloadavg()
    print(f"model: {label}, bf16, {sum(p.stat().st_size for p in base.glob('*.safetensors')) / 1e9:.2f} GB; "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(f"{'run':<24} {'wall s':>8} {'peak RSS MB':>12}")
    for name, wall, rss in rows:
        print(f"{name:<24} {wall:8.2f} {rss:12.0f}")
    walls = {name: wall for name, wall, _ in rows}
    if "mergekit-yaml ties" in walls:
        ratio = walls["surgeon apply ties"] / walls["mergekit-yaml ties"]
        print(f"apply ties / mergekit wall: {ratio:.3f} (target <= 0.2)")
        diff = max_rel_diff(runs / "surgeon-ties", runs / "mergekit-ties")
        print(f"apply ties vs mergekit, sampled tensors: max relative difference {diff:.2e}")
    elif args.part != "svd":
        print("mergekit-yaml not found: set SURGEON_MERGEKIT_PYTHON (see .ci/run)")
    if "surgeon apply ties" in walls:
        print(f"apply peak RSS: {rows[0][2]:.0f} MB (target <= 1000)")
    if "peft add_weighted svd" in walls:
        ratio = walls["surgeon combine svd"] / walls["peft add_weighted svd"]
        print(f"combine svd / peft wall: {ratio:.3f}")
        diff = lora_products_diff(runs / "surgeon-svd", runs / "peft-svd" / "mix")
        print(f"combine svd vs peft, sampled modules: max relative difference of B·A {diff:.2e}")
    shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
