"""Find the intruder dimensions of a downloaded fine-tune, rescale them, and measure what changed.

The flow, with the CLI (TUNED and BASE are Hub ids ``org/name[@rev]`` or local folders):

    surgeon intruders ORG/TUNED --base ORG/BASE --plot plots/
    surgeon scale-intruders ORG/TUNED --base ORG/BASE --lambda 0.5 -o repaired/
    surgeon intruders repaired/ --base ORG/BASE
    surgeon eval repaired/ --data probe.jsonl --drift-from ORG/BASE

This script runs the same steps through the library and prints a before/after table:

    python examples/scale_intruders_flow.py ORG/TUNED ORG/BASE --lambda 0.5 --data probe.jsonl

Offline (no Hub): the base is all-MiniLM-L6-v2 from the ``demo`` extra, and the "fine-tune"
is a copy with one planted intruder direction in every query and value matrix:

    python examples/scale_intruders_flow.py --demo
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from surgeon.io.checkpoint import Checkpoint
from surgeon.io.writer import CheckpointWriter, TensorSpec
from surgeon.workflows.spectral.intruders import find_intruders
from surgeon.workflows.spectral.scale_intruders import scale_intruders


def drift(model: str | Path, base: str | Path, data: str | Path) -> float:
    """Forgetting: 1 - mean cosine between the model's and the base's sentence embeddings of ``data``'s texts."""
    from surgeon.workflows.train.evaluate import evaluate

    report = evaluate(model, data=data, drift_from=base, device="cpu")
    assert report.drift is not None
    return 1.0 - report.drift.mean_cosine


def run_flow(tuned: str | Path, base: str | Path, lam: float, workdir: Path, *, data: str | Path | None = None) -> dict[str, Any]:
    """intruders -> scale-intruders -> intruders again (-> drift before/after); returns the numbers."""
    before = find_intruders(tuned, base, plot=workdir / "plots", device="cpu")
    print(f"{tuned}: {before.totals['intruders']} intruder dimensions in "
          f"{before.totals['with_intruders']} of {before.totals['matrices']} matrices (top-{before.top_k}, eps={before.epsilon})")
    for row in sorted(before.matrices, key=lambda r: -r.energy_share)[:5]:
        if row.intruders:
            cos = row.cos_left or []
            print(f"  {row.name}: ranks {row.intruders}, |cos| {[round(cos[j - 1], 3) for j in row.intruders]}, "
                  f"{100 * row.energy_share:.1f}% of the top-{before.top_k} energy")
    repaired = workdir / f"repaired-lambda-{lam:g}"
    scaled = scale_intruders(tuned, base, repaired, lam=lam, device="cpu")
    after = find_intruders(repaired, base, device="cpu")
    print(f"scaled the intruders of {len(scaled.changes)} matrices by {lam:g} -> {repaired}")
    print(f"intruders: {before.totals['intruders']} before, {after.totals['intruders']} after")
    result = {"before": before.totals["intruders"], "after": after.totals["intruders"], "scaled": len(scaled.changes),
              "output": str(repaired), "plots": before.plots}
    if data is not None:
        result["drift_before"], result["drift_after"] = drift(tuned, base, data), drift(repaired, base, data)
        print(f"embedding drift from the base: {result['drift_before']:.4f} before, {result['drift_after']:.4f} after")
    return result


def plant_intruders(base: Path, out: Path, *, modules: tuple[str, ...] = ("query", "value")) -> Path:
    """A copy of ``base`` where each matched matrix W (out x in) gets W + 1.5*sigma_1(W) * u v^T.

    u is the normalized sum of W's left singular vectors (|cos| = 1/sqrt(out) with each of them:
    an intruder), v a seeded random unit vector. Every other tensor is copied byte for byte.
    """
    gen = torch.Generator().manual_seed(0)
    with Checkpoint.open(base) as ckpt:
        names = ckpt.keys()
        planted = {n for n in names if n.endswith(tuple(f".{m}.weight" for m in modules)) and len(ckpt.info(n).shape) == 2}
        specs = [TensorSpec(n, ckpt.info(n).dtype, ckpt.info(n).shape) for n in names]
        with CheckpointWriter(out, specs, inputs=[base], extra_files=ckpt.extra_files()) as writer:
            for name in names:
                if name not in planted:
                    writer.copy_from(ckpt, name)
                    continue
                w = ckpt.get(name, dtype=torch.float64)
                u0, s0, _ = torch.linalg.svd(w, full_matrices=False)
                u = u0.sum(dim=1) / u0.sum(dim=1).norm()
                v = torch.randn(w.shape[1], generator=gen, dtype=torch.float64)
                w += 1.5 * s0[0] * torch.outer(u, v / v.norm())
                writer.write(name, w.to(ckpt.info(name).torch_dtype))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tuned", nargs="?", help="fine-tuned model: Hub id org/name[@rev] or folder")
    parser.add_argument("base", nargs="?", help="its base model: Hub id or folder")
    parser.add_argument("--lambda", dest="lam", type=float, default=0.5, help="intruder scale (0 removes them; default 0.5)")
    parser.add_argument("--data", help="JSONL/CSV with a 'text' column: measure embedding drift before and after")
    parser.add_argument("-o", "--workdir", type=Path, default=None, help="output folder (default: a temp folder)")
    parser.add_argument("--demo", action="store_true", help="offline: all-MiniLM-L6-v2 with planted intruders")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="surgeon-intruders-"))
    if args.demo:
        from surgeon.io.embedded import data_file, minilm_path

        base = minilm_path()
        tuned = plant_intruders(base, workdir / "minilm-planted")
        run_flow(tuned, base, args.lam, workdir, data=args.data or data_file("topic_eval.jsonl"))
        return
    if not (args.tuned and args.base):
        parser.error("give TUNED and BASE (Hub ids or folders), or --demo")
    run_flow(args.tuned, args.base, args.lam, workdir, data=args.data)


if __name__ == "__main__":
    main()
