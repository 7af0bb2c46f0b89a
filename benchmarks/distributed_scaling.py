"""Cold `surgeon intruders` on the ~1.1B Llama-shaped model with 1 and 2 ranks (1 thread per rank).

The model (bf16, random weights, TinyLlama shapes) and a rank-16 LoRA on all seven projections
come from ``benchmarks/_models.py`` (built once, cached in --workdir). Each round runs, with an
empty base cache each time and ``OMP_NUM_THREADS=1`` per rank:

* ``surgeon intruders --base MODEL --adapter LORA`` in one process;
* the same with ``--nproc 2`` (torch's elastic launcher, gloo).

Printed side by side from one run: wall time of each (whole process, model files in the page
cache), the speedup (target >= 1.6x at 2 ranks on 2 cores), the per-rank share of the planned SVD
cost, and the per-matrix cost fit used for the README's estimate of larger scans. Intruder counts
must be equal matrix by matrix; the script exits 1 if they are not.

    python benchmarks/distributed_scaling.py [--layers 22] [--repeat 1] [--workdir /tmp/surgeon-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import warm_cache  # noqa: E402
from benchmarks._models import build_llama_checkpoint, build_lora_adapter  # noqa: E402

PROJ = r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def run(args: list[str], nproc: int) -> tuple[float, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    extra = ["--nproc", str(nproc)] if nproc > 1 else []
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "surgeon", "intruders", *args, "--json", "-q", *extra],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"surgeon intruders (nproc {nproc}) failed:\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout)


def counts(doc: dict) -> dict[str, int]:
    return {m["name"]: len(m["intruders"]) for m in doc["matrices"]}


def cost_fit(doc: dict) -> float:
    """Seconds per unit of m·n·min(m, n), least squares through the origin over the analysed matrices."""
    pairs = [(m["shape"][0] * m["shape"][1] * min(m["shape"]), m["seconds"]) for m in doc["matrices"]
             if m["status"] == "analysed"]
    return sum(c * s for c, s in pairs) / sum(c * c for c, _ in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/surgeon-bench")
    parser.add_argument("--layers", type=int, default=22, help="Layers measured (7 matrices each; 22: all).")
    parser.add_argument("--repeat", type=int, default=1, help="Interleaved rounds; medians are printed.")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = build_llama_checkpoint(work / "llama-1.1b")
    adapter = build_lora_adapter(model, work / "lora-all-linear-r16", rank=16)
    pattern = rf"model\.layers\.({'|'.join(str(i) for i in range(args.layers))})\.{PROJ}\.weight$"
    cache = work / "svd-cache-scaling"
    warm_cache(str(model))
    common = ["--base", str(model), "--adapter", str(adapter), "--targets", pattern, "--cache", str(cache)]
    walls: dict[int, list[float]] = {1: [], 2: []}
    docs: dict[int, dict] = {}
    for _ in range(args.repeat):
        for nproc in (1, 2):
            shutil.rmtree(cache, ignore_errors=True)  # cold: every base matrix decomposed
            wall, doc = run(common, nproc)
            walls[nproc].append(wall)
            docs[nproc] = doc
    warm_wall, warm_doc = run(common, 1)  # the cache holds every base decomposition now
    shutil.rmtree(cache, ignore_errors=True)
    one, two = statistics.median(walls[1]), statistics.median(walls[2])
    n = len(docs[1]["matrices"])
    load = os.getloadavg()
    print(f"cold intruders, {n} matrices ({args.layers} of 22 layers x 7 projections), LoRA r=16, CPU, "
          f"1 thread per rank; median of {args.repeat} round(s); load average {load[0]:.1f} {load[1]:.1f}\n")
    print(f"{'':<28} {'wall s':>9} {'speedup':>9}")
    print(f"{'1 rank':<28} {one:>9.1f} {1.0:>8.2f}x")
    print(f"{'2 ranks (--nproc 2)':<28} {two:>9.1f} {one / two:>8.2f}x   (target >= 1.6x)")
    by_rank: dict[int, float] = {}
    for m in docs[2]["matrices"]:
        by_rank[m["computed_by_rank"]] = by_rank.get(m["computed_by_rank"], 0.0) + m["seconds"]
    print("compute seconds per rank at 2 ranks: " + ", ".join(f"rank {r}: {s:.1f}" for r, s in sorted(by_rank.items())))
    fit, warm_fit = cost_fit(docs[1]), cost_fit(warm_doc)
    print(f"per-matrix cost fit (1 thread): cold {fit:.3e}, warm {warm_fit:.3e} s per m*n*min(m,n) "
          f"(warm run, 1 rank: {warm_wall:.1f} s)")
    units = 80 * (2 * 8192**3 + 2 * 1024 * 8192 * 1024 + 3 * 28672 * 8192 * 8192)  # Llama-70B: 560 matrices
    print(f"estimate, Llama-70B x 100 fine-tunes on CPU cores: base once {units * fit / 3600:.0f} core-hours, "
          f"each fine-tune {units * warm_fit / 3600:.0f} core-hours, in all "
          f"{units * (fit + 100 * warm_fit) / 3600:.0f} core-hours")
    same = counts(docs[1]) == counts(docs[2])
    print(f"intruder counts equal in every matrix: {same} "
          f"({sum(counts(docs[1]).values())} vs {sum(counts(docs[2]).values())})")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
