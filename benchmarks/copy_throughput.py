"""Stream a ~1.1B-parameter bf16 checkpoint (3 shards) through surgeon's reader -> writer.

Prints, side by side in one run: wall time against `cp -r` of the same folder
(target <= 1.5x) and peak RSS (target <= 1 GB, and flat in model size: a
model half the size is measured too).

    python benchmarks/copy_throughput.py [--workdir /tmp/surgeon-bench] [--repeat 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import measure, warm_cache  # noqa: E402
from benchmarks._models import build_llama_checkpoint  # noqa: E402


def run(model: Path, workdir: Path, repeat: int) -> dict[str, float]:
    cp_t, cp_sync_t, sg_t, sg_rss = [], [], [], []
    warm_cache(str(model))
    for _ in range(repeat):
        dst = workdir / "copy-cp"
        shutil.rmtree(dst, ignore_errors=True)
        t, _ = measure(["cp", "-r", str(model), str(dst)])
        cp_t.append(t)
        shutil.rmtree(dst, ignore_errors=True)
        t, _ = measure(["bash", "-c", f"cp -r {model} {dst} && sync -f {dst}/config.json"])
        cp_sync_t.append(t)
        shutil.rmtree(dst, ignore_errors=True)
        out = workdir / "copy-surgeon"
        shutil.rmtree(out, ignore_errors=True)
        t, rss = measure([sys.executable, "-m", "surgeon", "-q", "convert", str(model), "-o", str(out)])
        sg_t.append(t)
        sg_rss.append(rss)
        shutil.rmtree(out, ignore_errors=True)
    return {"cp": statistics.median(cp_t), "cp_sync": statistics.median(cp_sync_t),
            "surgeon": statistics.median(sg_t), "rss": max(sg_rss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/surgeon-bench")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for scale, label in ((1.0, "1.1B"), (0.5, "0.55B")):
        model = build_llama_checkpoint(workdir / f"llama-{label}" if scale != 1.0 else workdir / "llama-1.1b", scale=scale)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9
        r = run(model, workdir, args.repeat)
        rows.append((label, size, r))
    print(f"{'model':>6} {'GB':>5} {'cp -r s':>8} {'cp+sync s':>9} {'surgeon s':>9} {'ratio/cp':>8} {'ratio/cp+sync':>13} {'peak RSS MB':>11}")
    for label, size, r in rows:
        print(f"{label:>6} {size:5.2f} {r['cp']:8.2f} {r['cp_sync']:9.2f} {r['surgeon']:9.2f} "
              f"{r['surgeon'] / r['cp']:8.2f} {r['surgeon'] / r['cp_sync']:13.2f} {r['rss']:11.0f}")
    full, half = rows[0][2], rows[1][2]
    print(f"\ntime ratio surgeon/cp (1.1B): {full['surgeon'] / full['cp']:.2f}x  (target <= 1.5x)")
    print(f"peak RSS (1.1B): {full['rss']:.0f} MB  (target <= 1024 MB); half-size model: {half['rss']:.0f} MB "
          f"(ratio {full['rss'] / half['rss']:.2f}: flat means ~1.0)")


if __name__ == "__main__":
    main()
