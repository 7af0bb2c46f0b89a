"""diff / apply / extract-lora on a Llama-shaped bf16 checkpoint merged with a rank-16 LoRA.

Prints, side by side in one run: wall time and peak RSS of each command, against
reading both checkpoints once (`cat`, the physical limit of a diff that writes
nothing), `cp -r` of the base with and without `sync` (the yardstick for a command
that writes a model; surgeon fsyncs what it writes), and the fixed cost of starting
Python and importing torch, which every surgeon command pays.

    python benchmarks/diff_throughput.py [--scale 1.0] [--workdir /tmp/surgeon-bench] [--repeat 1] [--skip-svd]

The tuned model is `surgeon merge BASE LORA --dtype bf16`: the LoRA (all 7 projections)
changes ~85% of the parameters and every other tensor is identical.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import measure, warm_cache  # noqa: E402
from benchmarks._models import build_llama_checkpoint, build_lora_adapter  # noqa: E402

SURGEON = [sys.executable, "-m", "surgeon", "-q"]


def prepare(workdir: Path, scale: float) -> tuple[Path, Path, Path]:
    base = build_llama_checkpoint(workdir / f"llama-{scale:g}", scale=scale)
    lora = build_lora_adapter(base, workdir / f"lora-{scale:g}")
    tuned = workdir / f"merged-{scale:g}"
    if not (tuned / "surgeon_provenance.json").is_file():
        shutil.rmtree(tuned, ignore_errors=True)
        measure([*SURGEON, "merge", str(base), str(lora), "-o", str(tuned), "--dtype", "bf16", "--device", "cpu"])
    return base, lora, tuned


def timed(cmd: list[str], repeat: int, cleanup: Path | None = None) -> tuple[float, float]:
    times, rss = [], []
    for _ in range(repeat):
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        t, r = measure(cmd)
        times.append(t)
        rss.append(r)
    return statistics.median(times), max(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/surgeon-bench")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--skip-svd", action="store_true", help="Skip the SVD-bound rows (diff + ranks, extract-lora).")
    parser.add_argument("--ranks-only", action="store_true",
                        help="Only `diff --no-rank` against `diff` with rank statistics (and `diff --exact`).")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base, lora, tuned = prepare(work, args.scale)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 1e9
    tau, out, extracted = work / "bench-tau", work / "bench-applied", work / "bench-extracted"
    for folder in (base, tuned):
        warm_cache(str(folder))
    if args.ranks_only:
        _ranks_only(base, tuned)
        return
    rows = {
        "cat base+tuned": timed(["bash", "-c", f"cat {base}/* {tuned}/* > /dev/null"], args.repeat),
        "cp -r base": timed(["cp", "-r", str(base), str(work / "bench-cp")], args.repeat, work / "bench-cp"),
        "cp -r base + sync": timed(["bash", "-c", f"cp -r {base} {work / 'bench-cp'} && sync -f {work / 'bench-cp'}"],
                                   args.repeat, work / "bench-cp"),
        "python+torch start": timed([sys.executable, "-c", "import surgeon.workflows.taskvec.diff"], args.repeat),
        "diff (report)": timed([*SURGEON, "diff", str(tuned), str(base), "--no-rank", "--json"], args.repeat),
        "diff + ranks": None if args.skip_svd else timed([*SURGEON, "diff", str(tuned), str(base), "--json",
                                                          "--device", "cpu"], 1),
        "diff -o tau": timed([*SURGEON, "diff", str(tuned), str(base), "--no-rank", "-o", str(tau)], args.repeat, tau),
        "diff --adapter": timed([*SURGEON, "diff", str(tuned), str(base), "--no-rank", "--adapter", str(lora),
                                 "--device", "cpu", "--json"], args.repeat),
        "apply base tau": timed([*SURGEON, "apply", str(base), str(tau), "-o", str(out)], args.repeat, out),
        "extract-lora -r 16": None if args.skip_svd else timed([*SURGEON, "extract-lora", str(tuned), str(base), "-r",
                                                                "16", "-o", str(extracted), "--device", "cpu"], 1, extracted),
    }
    shutil.rmtree(work / "bench-cp", ignore_errors=True)
    tau_gb = sum(p.stat().st_size for p in tau.glob("*.safetensors")) / 1e9
    read, cp = rows["cat base+tuned"][0], rows["cp -r base"][0]  # type: ignore[index]
    print(f"model: {base.name}, {size:.2f} GB bf16 per checkpoint; task vector written: {tau_gb:.2f} GB float32")
    print(f"{'command':>20} {'wall s':>8} {'x cat':>7} {'x cp':>7} {'peak RSS MB':>11}")
    for name, row in rows.items():
        if row is None:
            continue
        t, rss = row
        print(f"{name:>20} {t:8.2f} {t / read:7.2f} {t / cp:7.2f} {rss:11.0f}")


def _ranks_only(base: Path, tuned: Path) -> None:
    """diff without, with randomised and with exact rank statistics, side by side."""
    rows = {
        "diff --no-rank": measure([*SURGEON, "diff", str(tuned), str(base), "--no-rank", "--json", "--device", "cpu"]),
        "diff (ranks)": measure([*SURGEON, "diff", str(tuned), str(base), "--json", "--device", "cpu"]),
    }
    base_t = rows["diff --no-rank"][0]
    print(f"{'command':>16} {'wall s':>8} {'x --no-rank':>12} {'peak RSS MB':>11}")
    for name, (t, rss) in rows.items():
        print(f"{name:>16} {t:8.2f} {t / base_t:12.2f} {rss:11.0f}")


if __name__ == "__main__":
    main()
