"""extract-lora's module types by name (NAMED_LAYOUTS) against transformers' own module classes.

For every model type in the table, each model class transformers has for it (base, causal LM, masked LM,
sequence and token classification) is built on the meta device, and every module with a 2-D weight must
get the same type from its name (guess_kind) as from its class: otherwise the names would make a LoRA
module peft cannot load, or store a Linear whole.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgeon.cli.main import cli
from surgeon.io.checkpoint import Checkpoint
from surgeon.workflows.taskvec.extract_lora import NAMED_LAYOUTS, guess_kind, kind_of, module_kinds

_AUTO = ("AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
         "AutoModelForTokenClassification")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")


def _models(model_type: str):
    """(class name, model on the meta device) for every auto class that knows the model type."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type)
    for attr in _LAYERS:
        if isinstance(getattr(config, attr, None), int):
            setattr(config, attr, 1)
    for auto in _AUTO:
        mapping = getattr(transformers, auto)._model_mapping
        if type(config) not in mapping:
            continue
        with torch.device("meta"):
            yield mapping[type(config)].__name__, getattr(transformers, auto).from_config(config)


def _mismatches(model_type: str) -> tuple[list[str], int]:
    wrong, seen = [], 0
    for cls, model in _models(model_type):
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
                continue
            seen += 1
            by_class, by_name = kind_of(module), guess_kind(name, model_type)
            if by_class != by_name:
                wrong.append(f"{cls}.{name}: {type(module).__name__} is {by_class}, its name says {by_name}")
    return wrong, seen


@pytest.mark.parametrize("model_type", sorted(NAMED_LAYOUTS))
def test_names_give_the_class_types(model_type):
    wrong, seen = _mismatches(model_type)
    assert seen > 0, f"no model class of transformers built for {model_type}"
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("model_type, module", [
    ("t5", "relative_attention_bias"), ("mpnet", "relative_attention_bias"), ("electra", "embeddings_project"),
    ("mixtral", "mlp.gate"), ("qwen2_moe", "shared_expert_gate"),
])
def test_layouts_the_names_get_wrong_are_caught(model_type, module):
    """Where the names give another type than the class (T5's relative_attention_bias is an Embedding, Mixtral's
    router no Linear, ...), the check above sees it, so these model types stay on the transformers route."""
    wrong, _ = _mismatches(model_type)
    assert any(module in w for w in wrong)
    assert model_type not in NAMED_LAYOUTS


def _t5_checkpoint(folder):
    import transformers

    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def test_other_model_types_take_the_class(tmp_path):
    with Checkpoint.open(_t5_checkpoint(tmp_path / "t5")) as ckpt:
        kinds, source = module_kinds(ckpt)
    assert source == "transformers"
    assert kinds["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"] == "embedding"


def _extract_one_change(base, name, scale, seed, tmp_path):
    """(extract-lora's --json, tuned tensors): ``base`` with tensor ``name`` moved by scale·noise, at rank 2."""
    tensors = load_file(base / "model.safetensors")
    torch.manual_seed(seed)
    tensors[name] = tensors[name] + scale * torch.randn_like(tensors[name])
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    (tuned / "config.json").write_text((base / "config.json").read_text())
    out = CliRunner().invoke(cli, ["extract-lora", str(tuned), str(base), "-r", "2", "-o",
                                   str(tmp_path / "lora"), "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.output), tensors


def test_known_layout_needs_no_model_class(tiny_llama, tmp_path):
    report, _ = _extract_one_change(tiny_llama, "model.layers.0.self_attn.q_proj.weight", 0.01, 1, tmp_path)
    assert report["module_types"] == "llama layout"
    assert [m["module"] for m in report["modules"]] == ["model.layers.0.self_attn.q_proj"]


def test_t5_relative_bias_becomes_an_embedding_lora(tmp_path):
    """On the transformers route the Embedding is factored as one (τᵀ), and peft loads it."""
    base = _t5_checkpoint(tmp_path / "base")
    name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    report, tensors = _extract_one_change(base, name, 0.1, 2, tmp_path)
    assert report["module_types"] == "transformers"
    assert [(m["module"], m["kind"]) for m in report["modules"]] == [(name[: -len(".weight")], "embedding")]
    import transformers
    from peft import PeftModel

    model = PeftModel.from_pretrained(transformers.T5ForConditionalGeneration.from_pretrained(base),
                                      tmp_path / "lora").merge_and_unload()
    merged = model.state_dict()[name]
    # rank 2 of the 8 x 2 table is all of τ: peft's merge gives the tuned table back
    torch.testing.assert_close(merged, tensors[name], rtol=1e-5, atol=1e-6)
