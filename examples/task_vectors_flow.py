"""Task vectors: diff fine-tunes against their base, then scale and add them (task arithmetic).

The flow, with the CLI (models are Hub ids ``org/name[@rev]`` or local folders):

    surgeon diff ORG/TUNED_A ORG/BASE -o tau_a/        # tau_a = theta_A - theta_base, changed tensors only
    surgeon diff ORG/TUNED_B ORG/BASE -o tau_b/
    surgeon apply ORG/BASE tau_a:0.5 tau_b:0.5 -o combined/
    surgeon diff combined/ ORG/BASE                     # what the combination changed

This script runs the same steps through the library, prints what each fine-tune changed,
and checks that the combined model is theta_base + sum(lambda_i * tau_i), tensor by tensor:

    python examples/task_vectors_flow.py ORG/BASE ORG/TUNED_A ORG/TUNED_B --lambdas 0.5 0.5

Offline (no Hub): the base is all-MiniLM-L6-v2 from the ``demo`` extra, and two "fine-tunes"
are copies with seeded low-rank changes in different layers:

    python examples/task_vectors_flow.py --demo
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from surgeon.io.checkpoint import Checkpoint
from surgeon.io.resolve import resolve_path
from surgeon.io.writer import CheckpointWriter, TensorSpec
from surgeon.workflows.taskvec.apply import apply_task_vectors
from surgeon.workflows.taskvec.diff import DiffReport, diff_checkpoints


def describe(label: str, report: DiffReport, top: int = 3) -> None:
    s = report.summary
    print(f"{label}: {s.changed.tensors} tensors changed ({s.changed.parameters:,} parameters), "
          f"{s.rounding_only.tensors} rounding only, {s.identical.tensors} identical; ||tau|| = {s.norm:.4g}")
    changed = sorted((t for t in report.tensors if t.status == "changed"), key=lambda t: -(t.relative_norm or 0.0))
    for t in changed[:top]:
        rank = (f", numerical rank {t.rank.numerical_rank}, 99% of ||tau||^2 in {t.rank.rank_99} directions"
                if t.rank is not None else "")
        print(f"  {t.name}: ||tau||/||W|| = {t.relative_norm:.3g}{rank}")


def max_error(base: Path, combined: Path, taus: Sequence[tuple[Path, float]]) -> float:
    """max |combined - (base + sum(lambda * tau))| over every tensor a task vector holds (float32)."""
    worst = 0.0
    with Checkpoint.open(base) as b, Checkpoint.open(combined) as c:
        opened = [(Checkpoint.open(p), lam) for p, lam in taus]
        try:
            for name in sorted({n for tv, _ in opened for n in tv.keys()}):
                want = b.get(name, dtype=torch.float32)
                for tv, lam in opened:
                    if name in tv:
                        want = want + lam * tv.get(name, dtype=torch.float32)
                got = c.get(name, dtype=torch.float32)
                worst = max(worst, float((got - want.to(c.info(name).torch_dtype).float()).abs().max()))
        finally:
            for tv, _ in opened:
                tv.close()
    return worst


def run_flow(base: str | Path, tuned: Sequence[str | Path], lambdas: Sequence[float], workdir: Path) -> dict[str, Any]:
    """diff each fine-tune -> apply base + sum(lambda_i tau_i) -> diff the result; returns the numbers."""
    taus: list[tuple[Path, float]] = []
    changed = []
    for i, (model, lam) in enumerate(zip(tuned, lambdas)):
        tau = workdir / f"tau_{i}"
        report = diff_checkpoints(model, base, tau, device="cpu")
        describe(f"tau_{i} = {model} - base", report)
        taus.append((tau, lam))
        changed.append(report.summary.changed.tensors)
    combined = workdir / "combined"
    applied = apply_task_vectors(base, [(str(p), lam) for p, lam in taus], combined)
    print(f"apply: {combined} = base + " + " + ".join(f"{lam:g}*tau_{i}" for i, (_, lam) in enumerate(taus))
          + f" ({applied.computed} tensors computed, {applied.copied} copied byte for byte)")
    describe("combined - base", diff_checkpoints(combined, base, None, device="cpu"))
    error = max_error(resolve_path(base), combined, taus)
    print(f"max |combined - (base + sum lambda*tau)| = {error:.3g} (one rounding to the stored dtype)")
    return {"changed": changed, "computed": applied.computed, "copied": applied.copied, "max_error": error,
            "output": str(combined)}


def plant_changes(base: Path, out: Path, *, layers: Sequence[int], rank: int = 4, seed: int = 0) -> Path:
    """A copy of ``base`` with a seeded rank-``rank`` change (10% of ||W||) in the attention and MLP
    matrices of ``layers``; every other tensor copied byte for byte. A stand-in for a fine-tune."""
    gen = torch.Generator().manual_seed(seed)
    marks = tuple(f"layer.{i}." for i in layers)
    with Checkpoint.open(base) as ckpt:
        names = ckpt.keys()
        changed = {n for n in names if len(ckpt.info(n).shape) == 2 and any(m in n for m in marks)
                   and n.endswith(("query.weight", "key.weight", "value.weight", "dense.weight"))}
        specs = [TensorSpec(n, ckpt.info(n).dtype, ckpt.info(n).shape) for n in names]
        with CheckpointWriter(out, specs, inputs=[base], extra_files=ckpt.extra_files()) as writer:
            for name in names:
                if name not in changed:
                    writer.copy_from(ckpt, name)
                    continue
                w = ckpt.get(name, dtype=torch.float32)
                rows, cols = ckpt.info(name).shape
                delta = torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen)
                writer.write(name, (w + 0.1 * w.norm() / delta.norm() * delta).to(ckpt.info(name).torch_dtype))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", nargs="?", help="base model: Hub id org/name[@rev] or folder")
    parser.add_argument("tuned", nargs="*", help="fine-tunes of that base (one or more)")
    parser.add_argument("--lambdas", type=float, nargs="+", help="one weight per fine-tune (default 1/n each)")
    parser.add_argument("-o", "--workdir", type=Path, default=None, help="output folder (default: a temp folder)")
    parser.add_argument("--demo", action="store_true", help="offline: all-MiniLM-L6-v2 and two planted fine-tunes")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="surgeon-task-vectors-"))
    if args.demo:
        from surgeon.io.embedded import minilm_path

        base = minilm_path()
        tuned = [plant_changes(base, workdir / "tuned_a", layers=[0, 1, 2], seed=1),
                 plant_changes(base, workdir / "tuned_b", layers=[3, 4, 5], seed=2)]
        run_flow(base, tuned, args.lambdas or [0.5, 0.5], workdir)
        return
    if not (args.base and args.tuned):
        parser.error("give BASE and at least one TUNED (Hub ids or folders), or --demo")
    lambdas = args.lambdas or [1.0 / len(args.tuned)] * len(args.tuned)
    if len(lambdas) != len(args.tuned):
        parser.error(f"--lambdas: give one weight per fine-tune ({len(args.tuned)}), got {len(lambdas)}")
    run_flow(args.base, args.tuned, lambdas, workdir)


if __name__ == "__main__":
    main()
