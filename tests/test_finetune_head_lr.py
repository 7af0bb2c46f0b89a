"""`surgeon finetune --head-lr`: the classification head in its own optimizer group.

Checked on the saved outputs against the base's tensors (read with safetensors): with a
vanishing --lr and a real --head-lr only the head moves; without --head-lr the head moves with
the body's step (here: not at all).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from _finetune_helpers import build_model, lm_rows, sentiment_rows, write_jsonl
from surgeon.cli.main import cli
from surgeon.errors import OptionError
from surgeon.provenance import PROVENANCE_FILE
from surgeon.workflows.train.finetune import FinetuneOptions, finetune

TINY_LR = 1e-12


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("headlr")
    return {"bert": build_model("bert", root / "bert"), "llama": build_model("llama", root / "llama"),
            "train": write_jsonl(root / "train.jsonl", sentiment_rows(32, 0)),
            "lm": write_jsonl(root / "lm.jsonl", lm_rows(8, 0))}


def _train(data: dict[str, Path], out: Path, **kw):
    opts = dict(base=str(data["bert"]), data=str(data["train"]), out=str(out), epochs=2, batch_size=8, seed=0)
    return finetune(FinetuneOptions(**{**opts, **kw}))


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], names: list[str]) -> float:
    return max(float((after[n].float() - before[n].float()).abs().max()) for n in names)


def test_full_fine_tuning_head_moves_at_head_lr_body_at_lr(data, tmp_path):
    bare = load_file(str(data["bert"] / "model.safetensors"))  # a BertModel: the task model's names add "bert."
    base = {f"bert.{n}": t for n, t in bare.items()}
    body = [n for n in base if base[n].is_floating_point()]
    with_head = _train(data, tmp_path / "a", method="full", lr=TINY_LR, head_lr=1e-2)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    head = [n for n in a if n.startswith("classifier.")]
    assert head and with_head.head_lr == 1e-2 and set(body) <= set(a)
    assert _moved(base, a, body) < 1e-6
    _train(data, tmp_path / "b", method="full", lr=TINY_LR)
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert _moved(a, b, body) < 1e-6  # same body either way
    # the head starts from the same seeded init in both runs: moved by the head's step only in the first
    assert float((a["classifier.weight"] - b["classifier.weight"]).abs().max()) > 1e-3
    record = json.loads((tmp_path / "a" / PROVENANCE_FILE).read_text("utf-8"))
    assert record["parameters"]["head_lr"] == 1e-2


def test_lora_head_moves_adapter_stays_at_its_tiny_lr(data, tmp_path):
    _train(data, tmp_path / "a", method="lora", rank=4, lr=TINY_LR, head_lr=1e-2)
    _train(data, tmp_path / "b", method="lora", rank=4, lr=TINY_LR)
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    lora_b = [n for n in a if ".lora_B." in n]
    head = [n for n in a if "classifier" in n]
    assert lora_b and head
    assert max(float(a[n].abs().max()) for n in lora_b) < 1e-6  # B starts at zero, moves by ~lr per step
    assert max(float((a[n] - b[n]).abs().max()) for n in head) > 1e-3


def test_head_lr_refused_where_it_has_no_meaning(data, tmp_path):
    with pytest.raises(OptionError, match="--head-lr must be a positive number"):
        _train(data, tmp_path / "x", head_lr=0.0)
    with pytest.raises(OptionError, match="--head-lr is the classification head"):
        finetune(FinetuneOptions(base=str(data["llama"]), data=str(data["lm"]), out=str(tmp_path / "y"),
                                 task="causal-lm", head_lr=1e-3, epochs=1))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_takes_head_lr(data, tmp_path):
    out = tmp_path / "c"
    result = CliRunner().invoke(cli, ["finetune", str(data["bert"]), "--data", str(data["train"]), "--method", "full",
                                      "--epochs", "1", "--lr", "1e-12", "--head-lr", "5e-3", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["head_lr"] == 5e-3
