"""One configuration of PEFT's custom-model matrix: build it with peft, save base and adapter(s), merge
with ``surgeon merge --dtype fp32`` and with peft's ``merge_and_unload()``, and say how they compare.

Run as a script (``python tests/_peft_matrix.py``) to print the counts per tuner.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from _peft_matrix_cases import MULTI, SINGLE  # noqa: E402
from _peft_matrix_models import build  # noqa: E402

# Cases whose surgeon merge equals peft's to float32 rounding but not bit for bit, and why.
NOT_BIT_IDENTICAL: dict[str, str] = {
    "Embedding + transformers Conv1D 1 VeRA": (
        "a Conv1D with one output column: torch computes the VeRA product with a matrix-vector kernel whose "
        "order of additions depends on the thread count; surgeon's streamed merge runs torch on one thread, "
        "peft in the test process on all, so they agree bit for bit only on one core (else within 1e-8)"),
}


@dataclass(frozen=True)
class Outcome:
    """``status``: bit-identical, close (within ``max_diff``), refused (both peft and surgeon refuse),
    unbuildable (peft cannot even create it), or a failure: wrong, not-refused, peft-only, crash."""

    name: str
    tuner: str
    status: str
    detail: str = ""
    max_diff: float = 0.0


def _config(cls_name: str, kwargs: dict[str, Any]) -> Any:
    def value(v: Any) -> Any:
        if isinstance(v, tuple) and len(v) == 3 and v[0] == "config":
            from peft.tuners.lora import config as lora_config

            cls = getattr(peft, v[1], None) or getattr(lora_config, v[1])
            return cls(**{k: value(x) for k, x in v[2].items()})
        return copy.deepcopy(v)

    return getattr(peft, cls_name)(**{k: value(v) for k, v in kwargs.items()})


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable adapter parameter away from its (often identity) initialization."""
    gen = torch.Generator().manual_seed(seed)
    for _, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point():
            param.add_(torch.randn(param.shape, generator=gen) * 0.1)


def _effective(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's merged state with any ModulesToSaveWrapper it left in place (LN-tuning with modules_to_save
    does) read as what its forward uses: the trained copy, not the original."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if "original_module" in parts:
            continue
        if "modules_to_save" in parts:
            i = parts.index("modules_to_save")
            key = ".".join(parts[:i] + parts[i + 2:])  # drop "modules_to_save.<adapter name>"
        out[key] = value
    return out


def _cli_merge(base: Path, adapters: list[Path], out: Path) -> tuple[int, str]:
    from surgeon.cli.main import cli

    result = CliRunner().invoke(cli, ["-q", "merge", str(base), *map(str, adapters), "-o", str(out), "--dtype", "fp32"])
    return result.exit_code, result.output


def run_case(name: str, model_id: str, cls_name: str, configs: list[dict[str, Any]], tmp: Path) -> Outcome:
    """Build, save, merge both ways and compare one case (``configs``: one or two adapters' kwargs)."""
    tuner = cls_name.removesuffix("Config")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            base = build(model_id)
            (tmp / "base").mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp / "base" / "model.safetensors"))
            torch.manual_seed(0)
            model = peft.get_peft_model(copy.deepcopy(base), _config(cls_name, configs[0]))
            if len(configs) > 1:
                model.add_adapter("other", _config(cls_name, configs[1]))
            _randomize(model, 1)
            model.save_pretrained(tmp / "adapter")
        except Exception as exc:  # noqa: BLE001 - peft itself cannot build this case here
            return Outcome(name, tuner, "unbuildable", f"{type(exc).__name__}: {exc}"[:200])
        adapters = [tmp / "adapter"] + ([tmp / "adapter" / "other"] if len(configs) > 1 else [])
        try:
            if len(configs) > 1:
                model.base_model.set_adapter(["default", "other"])
            reference = _effective(model.merge_and_unload().state_dict())
        except Exception as exc:  # noqa: BLE001 - peft refuses to merge it
            reference, peft_error = None, f"{type(exc).__name__}: {exc}"[:200]
        code, output = _cli_merge(tmp / "base", adapters, tmp / "merged")
    lines = [line for line in output.strip().splitlines() if line.strip()]
    if reference is None:
        if code != 0 and len(lines) == 1 and lines[0].startswith("Error: "):
            return Outcome(name, tuner, "refused", lines[0])
        return Outcome(name, tuner, "not-refused", f"peft: {peft_error}; surgeon: exit {code} {output[-300:]}")
    if code != 0:
        one_line = len(lines) == 1 and lines[0].startswith("Error: ")
        return Outcome(name, tuner, "peft-only" if one_line else "crash", output[-400:])
    got = load_file(str(tmp / "merged" / "model.safetensors"))
    if sorted(got) != sorted(reference):
        return Outcome(name, tuner, "wrong", f"tensors {sorted(got)} vs peft's {sorted(reference)}")
    worst = max((float((got[k] - reference[k].float()).abs().max()) if got[k].numel() else 0.0) for k in got)
    if all(torch.equal(got[k], reference[k].float()) for k in got):
        return Outcome(name, tuner, "bit-identical")
    scale = max(float(reference[k].abs().max()) for k in got if reference[k].numel())
    status = "close" if worst <= 1e-5 * max(1.0, scale) else "wrong"
    return Outcome(name, tuner, status, f"max |surgeon - peft| = {worst:.3g}", worst)


def all_cases() -> list[tuple[str, str, str, list[dict[str, Any]]]]:
    """Every case of both lists: (id, model, config class, [kwargs per adapter]); duplicate names numbered."""
    cases, seen = [], Counter()
    for name, model_id, cls_name, kwargs in SINGLE:
        seen[name] += 1
        cases.append((name if seen[name] == 1 else f"{name} #{seen[name]}", model_id, cls_name, [kwargs]))
    for name, _, cls_name, first, second in MULTI:
        label = f"two adapters: {name}"
        seen[label] += 1
        cases.append((label if seen[label] == 1 else f"{label} #{seen[label]}", "MLP", cls_name, [first, second]))
    return cases


def main() -> None:
    torch.set_num_threads(1)
    counts: dict[str, Counter] = defaultdict(Counter)
    bad = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, model_id, cls_name, configs) in enumerate(all_cases()):
            outcome = run_case(name, model_id, cls_name, configs, Path(tmp) / str(i))
            counts[outcome.tuner][outcome.status] += 1
            if outcome.status not in ("bit-identical", "refused", "unbuildable") and name not in NOT_BIT_IDENTICAL:
                bad.append(outcome)
    statuses = ["bit-identical", "close", "refused", "unbuildable", "peft-only", "not-refused", "wrong", "crash"]
    print(f"{'tuner':<16}" + "".join(f"{s:>14}" for s in statuses))
    for tuner in sorted(counts):
        print(f"{tuner:<16}" + "".join(f"{counts[tuner][s]:>14}" for s in statuses))
    total = sum(counts.values(), Counter())
    print(f"{'total':<16}" + "".join(f"{total[s]:>14}" for s in statuses))
    for outcome in bad:
        print(f"{outcome.status}: {outcome.name}: {outcome.detail}")


if __name__ == "__main__":
    main()
