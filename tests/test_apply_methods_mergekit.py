"""`surgeon apply --method ...` against mergekit 0.1.5 itself, on tiny Llama fine-tunes in float32.

mergekit runs in its own venv (``SURGEON_MERGEKIT_PYTHON``, else /work/venvs/mergekit/bin/python; .ci/run
installs it from PyPI), all jobs in one process (tests/_mergekit_driver.py). Deterministic methods: every
tensor within 1e-6 relative (max-norm) of mergekit's output. DELLA draws random masks, mergekit's from
torch's global generator, ours from the counter generator, so there the formula is checked with mergekit's
own rescale applied to our masks, and the keep probabilities by magnitude rank against mergekit's output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from surgeon.io.checkpoint import Checkpoint
from surgeon.ops.combine import keep_mask
from surgeon.workflows.taskvec.apply import apply_task_vectors
from surgeon.workflows.taskvec.methods import ApplyOptions, TensorMerge, Term

DRIVER = Path(__file__).with_name("_mergekit_driver.py")
TOL = 1e-6


def _mergekit_python() -> str | None:
    candidate = os.environ.get("SURGEON_MERGEKIT_PYTHON") or "/work/venvs/mergekit/bin/python"
    if not Path(candidate).is_file():
        return None
    probe = subprocess.run([candidate, "-c", "import mergekit"], capture_output=True, text=True)
    return candidate if probe.returncode == 0 else None


MERGEKIT = _mergekit_python()
pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="mergekit 0.1.5 is not installed in a venv "
                                "(set SURGEON_MERGEKIT_PYTHON, or see .ci/run for the install)")

# name -> (surgeon inputs as (fine-tune index, weight), ApplyOptions, mergekit YAML body after the models)
CASES = {
    "task_arithmetic": ([(1, 0.7), (2, -0.3)], ApplyOptions(), "merge_method: task_arithmetic\n"),
    "task_arithmetic_normalized": ([(1, 0.7), (2, 0.5)], ApplyOptions(normalize=True, lambda_scale=0.5),
                                   "merge_method: task_arithmetic\nparameters: {normalize: true, lambda: 0.5}\n"),
    "ties": ([(1, 1.0), (2, 0.6)], ApplyOptions(method="ties", density=0.4), "merge_method: ties\n"),
    "ties_three_negative": ([(1, 1.0), (2, -0.5), (3, 0.8)], ApplyOptions(method="ties", density=0.3),
                            "merge_method: ties\n"),
    "breadcrumbs": ([(1, 0.9), (2, 0.4)], ApplyOptions(method="breadcrumbs", density=0.5, gamma=0.05),
                    "merge_method: breadcrumbs\n"),
    "breadcrumbs_ties": ([(1, 0.9), (2, 0.4)], ApplyOptions(method="breadcrumbs_ties", density=0.6, gamma=0.02),
                         "merge_method: breadcrumbs_ties\n"),
    "slerp": ([(1, 1.0)], ApplyOptions(method="slerp", t=0.3), "merge_method: slerp\nparameters: {t: 0.3}\n"),
    "model_stock": ([(1, 1.0), (2, 1.0), (3, 1.0)], ApplyOptions(method="model_stock"), "merge_method: model_stock\n"),
}
DELLA = ([(1, 0.8)], ApplyOptions(method="della_linear", density=0.5, epsilon=0.2, seed=7))


def _model_params(weight: float, opts: ApplyOptions) -> dict[str, float]:
    if opts.method in ("slerp", "model_stock"):
        return {}
    params: dict[str, float] = {"weight": weight}
    if opts.method != "task_arithmetic":
        params["density"] = opts.density
    if opts.method.startswith("breadcrumbs"):
        params["gamma"] = opts.gamma
    if opts.method.startswith("della"):
        params["epsilon"] = opts.epsilon
    return params


def _config(base: Path, fts: dict[int, Path], inputs, opts: ApplyOptions, body: str) -> str:
    models = [{"model": str(fts[i]), "parameters": _model_params(w, opts)} for i, w in inputs]
    if opts.method in ("slerp", "model_stock"):
        models = [{"model": str(base)}] + [{"model": str(fts[i])} for i, _ in inputs]
    return json.dumps({"base_model": str(base), "models": models, "dtype": "float32", **yaml.safe_load(body)})


@pytest.fixture(scope="module")
def finetunes(tiny_llama, tmp_path_factory) -> dict[int, Path]:
    """Three float32 'fine-tunes' of the tiny Llama: every tensor moved by 0.01·N(0, 1)."""
    weights = load_file(tiny_llama / "model.safetensors")
    out = {}
    for i in (1, 2, 3):
        folder = tmp_path_factory.mktemp(f"ft{i}")
        gen = torch.Generator().manual_seed(100 + i)
        save_file({n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in weights.items()},
                  folder / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(tiny_llama / "config.json", folder / "config.json")
        out[i] = folder
    return out


@pytest.fixture(scope="module")
def runs(tiny_llama, finetunes, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (surgeon's output, mergekit's output); DELLA also gets mergekit's rescale of our masks."""
    root = tmp_path_factory.mktemp("mergekit")
    jobs, out = [], {}
    for name, (inputs, opts, body) in {**CASES, "della_linear": (*DELLA, "merge_method: della_linear\n")}.items():
        ours = root / f"surgeon-{name}"
        apply_task_vectors(tiny_llama, [(finetunes[i], w) for i, w in inputs], ours, options=opts)
        jobs.append({"kind": "merge", "out": str(root / f"mergekit-{name}"), "seed": 0,
                     "config": _config(tiny_llama, finetunes, inputs, opts, body)})
        out[name] = (ours, root / f"mergekit-{name}")
    taus, masks = _della_masks(tiny_llama, finetunes[1])
    save_file(taus, root / "della-taus.safetensors")
    save_file(masks, root / "della-masks.safetensors")
    jobs.append({"kind": "rescale", "taus": str(root / "della-taus.safetensors"),
                 "masks": str(root / "della-masks.safetensors"), "out": str(root / "della-rescaled.safetensors")})
    (root / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run([MERGEKIT, str(DRIVER), str(root / "jobs.json")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out["della_rescaled"] = (root / "della-rescaled.safetensors", root / "della-rescaled.safetensors")
    return out


def _della_masks(base: Path, finetune: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """τ and our DELLA keep masks per tensor (the rules surgeon's first sweep decides, whole tensor as one block)."""
    taus, masks = {}, {}
    with Checkpoint.open(base) as b, Checkpoint.open(finetune) as f:
        for name in b.keys():
            job = TensorMerge(b, name, [Term(f, DELLA[0][0][1], True, 0)], DELLA[1])
            assert job.prepare()
            tau = (f.get(name).float() - b.get(name).float()).reshape(-1)
            rows = job.rows(tau)
            taus[name] = tau.reshape(b.info(name).shape)
            masks[name] = keep_mask(rows, job.rules[0], 0).reshape(b.info(name).shape).float()
    return taus, masks


def _assert_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(ref)
    for name, r in ref.items():
        err = float((ours[name].double() - r.double()).abs().max())
        assert err <= TOL * float(r.double().abs().max()), (name, err)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_mergekit(runs, case):
    ours, theirs = runs[case]
    _assert_close(load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors"))


def test_della_linear_is_mergekits_rescale_of_our_masks(runs, tiny_llama):
    """θ = θ_base + w·rescale_L1(τ ⊙ M): the rescale computed by mergekit's own function on our masks."""
    ours = load_file(runs["della_linear"][0] / "model.safetensors")
    rescaled = load_file(runs["della_rescaled"][0])
    base = load_file(tiny_llama / "model.safetensors")
    weight = DELLA[0][0][1]
    _assert_close(ours, {n: base[n] + weight * rescaled[n] for n in base})


def _keep_by_rank(model: dict[str, torch.Tensor], base: dict[str, torch.Tensor], tau: dict[str, torch.Tensor],
                  buckets: int = 4) -> torch.Tensor:
    """Fraction kept in each quarter of the per-row magnitude ranks (2-D tensors)."""
    kept, total = torch.zeros(buckets), torch.zeros(buckets)
    for name, t in tau.items():
        if t.dim() != 2:
            continue
        rank = t.abs().argsort(dim=1).argsort(dim=1).float() / max(t.shape[1] - 1, 1)
        bucket = (rank * buckets).clamp(max=buckets - 1).long()
        changed = (model[name] != base[name]).float()
        kept += torch.bincount(bucket.reshape(-1), weights=changed.reshape(-1), minlength=buckets)
        total += torch.bincount(bucket.reshape(-1), minlength=buckets).float()
    return kept / total


def test_della_keep_probabilities_follow_magnitude_rank_like_mergekit(runs, tiny_llama, finetunes):
    base = load_file(tiny_llama / "model.safetensors")
    tau = {n: t - base[n] for n, t in load_file(finetunes[1] / "model.safetensors").items()}
    ours = _keep_by_rank(load_file(runs["della_linear"][0] / "model.safetensors"), base, tau)
    theirs = _keep_by_rank(load_file(runs["della_linear"][1] / "model.safetensors"), base, tau)
    density, eps = DELLA[1].density, DELLA[1].epsilon
    expected = torch.tensor([density - eps + 2 * eps * (k + 0.5) / 4 for k in range(4)])
    assert torch.allclose(ours, expected, atol=0.02), (ours, expected)
    assert torch.allclose(ours, theirs, atol=0.03), (ours, theirs)
