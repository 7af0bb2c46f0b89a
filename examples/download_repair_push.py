"""Download a fine-tune from the Hub, rescale its intruder dimensions, publish the repaired model.

The flow users run, with nothing but the ``surgeon`` CLI:

    surgeon inspect  ORG/TUNED                                      # fetches safetensors + configs only
    surgeon scale-intruders ORG/TUNED --base ORG/BASE --lambda 0.5 -o OUT
    surgeon push OUT ME/TUNED-repaired                               # one commit, model card included

(``scale-intruders ... --push-to ME/TUNED-repaired`` does the last two steps in one.)

Against the real Hub (needs a write token):

    HF_TOKEN=hf_... python examples/download_repair_push.py \\
        --tuned org/llama-ft --base meta-llama/Llama-3.2-1B --to me/llama-ft-repaired

Self-contained, against the Hub-protocol test server (tiny random models, no network):

    python examples/download_repair_push.py --demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
Repair = Callable[[str, str, float, Path], list[str]]


def scale_intruders(tuned: str, base: str, lam: float, out: Path) -> list[str]:
    """The repair step: each intruder singular value sigma becomes lambda * sigma."""
    return ["scale-intruders", tuned, "--base", base, "--lambda", str(lam), "-o", str(out)]


def surgeon(*args: str, env: dict[str, str]) -> str:
    """Run one surgeon command, echo it, and return its stdout (stops the example on failure)."""
    print("$ surgeon " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "surgeon", *args], env=env, text=True, capture_output=True)
    if proc.stderr.strip():
        print(proc.stderr.rstrip(), file=sys.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"surgeon {args[0]} failed (exit {proc.returncode}); see the error above.")
    print(proc.stdout.rstrip())
    return proc.stdout


def run_flow(tuned: str, base: str, lam: float, to: str, workdir: Path, env: dict[str, str], *,
             repair: Repair = scale_intruders) -> dict:
    """download -> repair -> push; returns the push report (JSON)."""
    surgeon("inspect", tuned, env=env)
    out = workdir / (to.split("/")[-1])
    surgeon(*repair(tuned, base, lam, out), env=env)
    report = json.loads(surgeon("push", str(out), to, "--json", env=env))
    print(f"\npublished {to}: {report['commit_url']}")
    return report


# -- --demo: the same flow against tests/hub_server.py ------------------------------------------

def build_demo_models(folder: Path) -> tuple[Path, Path]:
    """A tiny random Llama base and a 'fine-tune' with one planted intruder direction per attention/MLP matrix."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    base, tuned = folder / "base", folder / "tuned"
    model.save_pretrained(base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny base\n")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and name.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")):
                u0, s0, _ = torch.linalg.svd(param.float(), full_matrices=False)
                u = u0.sum(dim=1) / u0.sum(dim=1).norm()  # equally far from every base direction
                v = torch.randn(param.shape[1])
                param += 2 * s0[0] * torch.outer(u, v / v.norm())
    model.save_pretrained(tuned)
    return base, tuned


def demo(workdir: Path, repair: Repair = scale_intruders) -> dict:
    """Start the test Hub, publish the tiny models on it, run the flow, check the upload byte for byte."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from hub_server import WRITE_TOKEN, FakeHub

    hub = FakeHub().start()
    try:
        base, tuned = build_demo_models(workdir / "models")
        for repo, folder in (("demo/tiny-base", base), ("demo/tiny-tuned", tuned)):
            hub.add_repo(repo, {p.name: p.read_bytes() for p in folder.iterdir()})
        home = workdir / "hf_home"  # a private HF cache: the demo never touches the user's
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
               "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": WRITE_TOKEN, "PYTHONPATH": str(REPO_ROOT)}
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE"):
            env.pop(key, None)
        report = run_flow("demo/tiny-tuned", "demo/tiny-base", 0.5, "tester/tiny-repaired", workdir, env,
                          repair=repair)
        out = workdir / "tiny-repaired"
        remote = hub.files("tester/tiny-repaired")
        same = all(remote[p.name] == p.read_bytes() for p in out.iterdir() if p.is_file())
        print(f"upload byte-identical to {out}: {same}\n\n--- README.md on the Hub ---")
        print(remote["README.md"].decode())
        report["byte_identical"] = same
        report["card"] = remote["README.md"].decode()
        return report
    finally:
        hub.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tuned", help="Hub id of the fine-tuned model, org/name[@revision]")
    parser.add_argument("--base", help="Hub id of its base model")
    parser.add_argument("--to", help="repo id to publish the repaired model to")
    parser.add_argument("--lambda", dest="lam", type=float, default=0.5, help="intruder scale (default 0.5)")
    parser.add_argument("--workdir", type=Path, default=None, help="where outputs go (default: a temp folder)")
    parser.add_argument("--demo", action="store_true", help="run against the local test Hub with tiny models")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="surgeon-example-"))
    if args.demo:
        demo(workdir)
        return
    if not (args.tuned and args.base and args.to):
        parser.error("--tuned, --base and --to are required (or use --demo)")
    run_flow(args.tuned, args.base, args.lam, args.to, workdir, dict(os.environ))


if __name__ == "__main__":
    main()
