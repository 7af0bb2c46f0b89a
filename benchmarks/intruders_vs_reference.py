"""`surgeon intruders` against the reference method on the ~1.1B-parameter Llama-shaped model.

The model (bf16, random weights, TinyLlama shapes) gets a rank-16 LoRA on all seven linear
projections of every layer. The reference is the authors' method: for each matrix, a full
float32 ``torch.linalg.svd`` of the base and of the merged tuned weight, then
c_j = max_i |u_jᵀu₀,i|. surgeon runs `intruders --base MODEL --adapter LORA` with an empty
(cold) base cache, then again with the cache filled (warm). Intruder counts must be equal
matrix by matrix; the script exits 1 if they are not.

Printed side by side from one run: wall time of each (whole process, model files in the
page cache), ratios to the reference (targets: cold <= 0.6x, warm <= 0.1x), and how many
matrices were measured. ``--merged`` also times TUNED given as a merged bf16 checkpoint
(the dense-tuned route) against the reference on those stored weights.

    python benchmarks/intruders_vs_reference.py [--layers 2] [--repeat 3] [--device cpu] [--merged]

The reference is resumable (the 154-matrix one is hours of full SVDs on 2 cores): stopped, it keeps
every finished matrix in ``reference-*.json.partial`` and the next run continues from there, its
time then the sum of its processes' own.

Random Gaussian weights are the hardest case for an iterative top-k (the top singular
values sit at the edge of a flat bulk, 0.05% apart), so this measures the worst case.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

_STARTED = [time.perf_counter()]  # this process's start (before the heavy imports), for a resumed reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import warm_cache  # noqa: E402
from benchmarks._models import build_llama_checkpoint, build_lora_adapter  # noqa: E402

PROJ = r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def reference(model: str, adapter: str | None, tuned: str | None, pattern: str, out: str) -> None:
    """The authors' method on the selected matrices, for BASE + adapter and/or the merged TUNED.

    Per matrix: a full float32 SVD of the base and of each tuned weight, then c_j = max_i |u_jᵀu₀,i|.
    The base's SVD is done once and counted in both routes' times (each route's time: this process's
    start-up and reading, the base SVDs and its own tuned SVDs). Writes {"routes": {route: {name: [c_j]}},
    "seconds": {route: [wall, cpu]}} to ``out``.

    Resumable: after every matrix the results so far and this run's times go to ``out.partial``; a
    later run with the same pattern and routes starts after the last finished matrix and adds its
    times to the saved ones ("elapsed": the processes' own wall and CPU time from their start).
    """
    import re

    import torch
    from safetensors import safe_open

    from surgeon.io.checkpoint import Checkpoint

    base = Checkpoint.open(model)
    lora = safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") if adapter else None
    config = json.loads((Path(adapter) / "adapter_config.json").read_text()) if adapter else {}
    tuned_ckpt = Checkpoint.open(tuned) if tuned else None
    routes = (["adapter"] if lora is not None else []) + (["merged"] if tuned_ckpt is not None else [])
    result: dict[str, dict[str, list[float]]] = {r: {} for r in routes}
    own = {r: [0.0, 0.0] for r in ["base", *routes]}
    partial = Path(out + ".partial")
    earlier = [0.0, 0.0]
    if partial.is_file():
        saved = json.loads(partial.read_text())
        if saved["pattern"] == pattern and set(saved["routes"]) == set(routes):
            result, own, earlier = saved["routes"], saved["own"], saved["elapsed"]
            print(f"reference: resuming after {len(next(iter(result.values()), {}))} matrices", file=sys.stderr)

    def save_partial() -> None:
        elapsed = [earlier[0] + time.perf_counter() - _STARTED[0], earlier[1] + time.process_time()]
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps({"routes": result, "own": own, "pattern": pattern, "elapsed": elapsed}))
        tmp.replace(partial)

    def timed(route: str, work):  # type: ignore[no-untyped-def]
        wall, cpu = time.perf_counter(), time.process_time()
        value = work()
        own[route][0] += time.perf_counter() - wall
        own[route][1] += time.process_time() - cpu
        return value

    for name in base.keys():
        if not re.search(pattern, name) or all(name in result[r] for r in routes):
            continue
        w0 = timed("base", lambda: base.get(name).float())
        u0 = timed("base", lambda: torch.linalg.svd(w0, full_matrices=False)[0])
        for route in routes:
            def tuned_c() -> list[float]:
                if route == "adapter":
                    key = "base_model.model." + name[: -len(".weight")]
                    a, b = lora.get_tensor(key + ".lora_A.weight"), lora.get_tensor(key + ".lora_B.weight")
                    wt = w0 + (b @ a) * (config["lora_alpha"] / config["r"])  # peft's merge, float32
                else:
                    wt = tuned_ckpt.get(name).float()
                ut, _, _ = torch.linalg.svd(wt, full_matrices=False)
                return [float(x) for x in (ut[:, :10].T @ u0).abs().max(dim=1).values]
            result[route][name] = timed(route, tuned_c)
        save_partial()
    save_partial()
    saved = json.loads(partial.read_text())
    Path(out).write_text(json.dumps({**saved, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}))
    partial.unlink()


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys) of a child process; raises if it fails.

    CPU time is reported beside wall time because this machine's cores are shared: a
    contender that ran while others loaded the machine shows a longer wall time, not
    (much) more CPU time.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _surgeon(args: list[str], out: Path) -> tuple[tuple[float, float], dict]:
    cmd = " ".join([sys.executable, "-m", "surgeon", "-q", "intruders", *[f"'{a}'" for a in args], "--json"])
    times = measure(["bash", "-c", f"{cmd} > {out}"])
    return times, json.loads(out.read_text())


def _reference(model: Path, pattern: str, out: Path, *, adapter: Path | None, tuned: Path | None, reuse: bool
               ) -> dict[str, tuple[tuple[float, float], dict]]:
    """{route: ((wall, CPU seconds), {name: [c_j]})} of the reference, one process for both routes.

    A route's time is the whole process's less the other route's own tuned SVDs (so start-up, reading
    and the base's SVDs count in both). ``reuse``: take a finished run's ``out`` for the same matrices.
    """
    routes = (["adapter"] if adapter else []) + (["merged"] if tuned else [])
    saved = json.loads(out.read_text()) if reuse and out.is_file() else None
    if saved is None or saved.get("pattern") != pattern or not set(routes) <= set(saved["routes"]):
        cmd = [sys.executable, __file__, "--reference", str(model), "--pattern", pattern, "--out", str(out)]
        cmd += (["--adapter", str(adapter)] if adapter else []) + (["--tuned", str(tuned)] if tuned else [])
        resumed = Path(str(out) + ".partial").is_file()
        total = measure(cmd)
        saved = json.loads(out.read_text())
        # a resumed reference: its time is the sum of its processes' own (start-up of each included)
        saved["total"] = saved["elapsed"] if resumed else total
        out.write_text(json.dumps(saved))
    else:
        print(f"(reference reused from {out}, finished {saved['finished']})")
    own, total, done = saved["own"], saved["total"], list(saved["routes"])
    return {r: (tuple(total[i] - sum(own[o][i] for o in done if o != r) for i in range(2)), saved["routes"][r])
            for r in routes}


def _compare(ref: dict, body: dict, eps: float = 0.5) -> tuple[int, int, float, list[str]]:
    """(reference intruders, surgeon intruders, max |Δc_j|, matrices whose counts differ)."""
    ours = {m["name"]: m for m in body["matrices"]}
    n_ref = n_ours = 0
    worst, differ = 0.0, []
    for name, c_ref in ref.items():
        row = ours[name]
        c_ours = row["cos_left"] or [1.0] * len(c_ref)
        n_ref += sum(c < eps for c in c_ref)
        n_ours += len(row["intruders"])
        worst = max(worst, max(abs(a - b) for a, b in zip(c_ref, c_ours)))
        if sum(c < eps for c in c_ref) != len(row["intruders"]):
            differ.append(name)
    return n_ref, n_ours, worst, differ


def _merged_checkpoint(model: Path, adapter: Path, layers: int, out: Path) -> Path:
    """The selected layers' projections of model + LoRA, merged in float32 and stored bf16 (a "merged" TUNED)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from surgeon.io.checkpoint import Checkpoint

    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = {}
    with Checkpoint.open(model) as base, safe_open(str(adapter / "adapter_model.safetensors"), "pt") as lora:
        for name in base.keys():
            if any(f"layers.{i}." in name for i in range(layers)) and name.endswith("proj.weight"):
                key = "base_model.model." + name[: -len(".weight")]
                delta = lora.get_tensor(key + ".lora_B.weight") @ lora.get_tensor(key + ".lora_A.weight")
                tensors[name] = (base.get(name).float() + delta * (config["lora_alpha"] / config["r"])).bfloat16()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _rounds(repeat: int, cache: Path, args: list[str], work: Path, tag: str):  # type: ignore[no-untyped-def]
    """surgeon cold then warm, ``repeat`` times in turn; the median wall and CPU time of each."""
    times: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": []}
    for _ in range(repeat):
        shutil.rmtree(cache, ignore_errors=True)
        t, cold = _surgeon(args, work / f"cold{tag}.json")
        times["cold"].append(t)
        t, warm = _surgeon(args, work / f"warm{tag}.json")
        times["warm"].append(t)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    return med["cold"], cold, med["warm"], warm


def _row(label: str, times: tuple[float, float], ref: tuple[float, float], n: int) -> str:
    return (f"{label:<34} {times[0]:9.2f} {times[0] / ref[0]:8.3f} {times[1]:9.2f} {times[1] / ref[1]:8.3f} "
            f"{n:9d}")


_HEADER = f"{'':<34} {'wall s':>9} {'ratio':>8} {'CPU s':>9} {'ratio':>8} {'matrices':>9}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/surgeon-bench")
    parser.add_argument("--layers", type=int, default=2,
                        help="Layers measured (7 matrices each; 22 is the whole model).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--merged", action="store_true", help="Also time TUNED given as a merged checkpoint.")
    parser.add_argument("--merged-only", action="store_true",
                        help="Time only TUNED given as a merged checkpoint (skip BASE + adapter).")
    parser.add_argument("--repeat", type=int, default=1, help="Interleaved surgeon rounds; medians are printed.")
    parser.add_argument("--reuse-reference", action="store_true",
                        help="Take the reference from a finished run's file in --workdir (same matrices).")
    parser.add_argument("--reference-only", action="store_true", help="Run (and save) the reference only.")
    parser.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tuned", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pattern", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        reference(args.reference, args.adapter, args.tuned, args.pattern, args.out)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = build_llama_checkpoint(work / "llama-1.1b")
    adapter = build_lora_adapter(model, work / "lora-all-linear-r16", rank=16)
    pattern = rf"model\.layers\.({'|'.join(str(i) for i in range(args.layers))})\.{PROJ}\.weight$"
    cache = work / "svd-cache-bench"
    warm_cache(str(model))
    merged = (_merged_checkpoint(model, adapter, args.layers, work / f"merged-{args.layers}-layers")
              if args.merged or args.merged_only else None)
    routes = _reference(model, pattern, work / f"reference-{args.layers}-layers.json",
                        adapter=None if args.merged_only else adapter, tuned=merged,
                        reuse=args.reuse_reference)
    if args.reference_only:
        return
    common = ["--base", str(model), "--targets", pattern, "--device", args.device, "--cache", str(cache)]
    print(f"device {args.device}; surgeon: median of {args.repeat} round(s) of cold then warm; reference: one "
          "process for both routes, the base's SVD once per matrix and counted in both routes' times")
    failed = False
    if "adapter" in routes:
        failed |= _route("adapter", routes["adapter"], [*common, "--adapter", str(adapter)], args, work, cache,
                         f"LoRA r=16 on all linear layers ({args.layers} of 22 layers x 7 projections)", "")
    if merged is not None:
        failed |= _route("merged", routes["merged"], [str(merged), *common], args, work, cache,
                         "TUNED as a merged bf16 checkpoint", "-merged")
    sys.exit(1 if failed else 0)


def _route(label: str, reference_run: tuple[tuple[float, float], dict], args_: list[str], args: argparse.Namespace,
           work: Path, cache: Path, title: str, tag: str) -> bool:
    ref_t, ref = reference_run
    cold_t, cold, warm_t, warm = _rounds(args.repeat, cache, args_, work, tag)
    print(f"\n{title}: {len(ref)} matrices")
    print(_HEADER)
    print(_row("reference (full SVD x2, float32)", ref_t, ref_t, len(ref)))
    print(_row("surgeon intruders, cold cache", cold_t, ref_t, len(cold["matrices"])))
    print(_row("surgeon intruders, warm cache", warm_t, ref_t, len(warm["matrices"])))
    failed = _report_agreement(label, ref, [cold, warm])
    print(f"{label} cold/reference: {cold_t[0] / ref_t[0]:.3f}x wall, {cold_t[1] / ref_t[1]:.3f}x CPU; "
          f"warm/reference: {warm_t[0] / ref_t[0]:.3f}x wall, {warm_t[1] / ref_t[1]:.3f}x CPU")
    print(f"surgeon methods: {warm['methods']}; cache {cold['cache']['misses']} misses then "
          f"{warm['cache']['hits']} hits")
    return failed


def _report_agreement(label: str, ref: dict, bodies: list[dict]) -> bool:
    failed = False
    for tag, body in zip(("cold", "warm"), bodies):
        n_ref, n_ours, worst, differ = _compare(ref, body)
        print(f"{label} {tag}: intruders reference {n_ref}, surgeon {n_ours}; max |Δc_j| {worst:.2e}; "
              f"matrices with different counts: {len(differ)}" + (f" ({', '.join(differ)})" if differ else ""))
        failed |= bool(differ)
    return failed


if __name__ == "__main__":
    main()
