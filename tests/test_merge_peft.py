"""`surgeon merge` against peft's own merge_and_unload() on float32 bases: bit for bit.

Every case builds a real peft adapter on a tiny model (random non-trivial factors),
merges it with peft (the reference) and with surgeon, and compares every tensor
with torch.equal. surgeon follows peft's operation order, so no case needs the
1-ulp allowance the issue grants; where a case would need it, it would say so here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch

from _merge_helpers import load_model, make_adapter, peft_merged, read_folder, save_model
from surgeon.io.checkpoint import Checkpoint
from surgeon.workflows.merge.run import merge

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adalora_allocate(model: torch.nn.Module) -> None:
    """Run AdaLoRA's real rank allocation for a few steps so that saved ranks are pruned."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    ids = torch.randint(0, 128, (2, 8), generator=gen)
    model.train()
    for step in range(model.peft_config["default"].total_step):
        model(input_ids=ids, labels=ids).loss.backward()
        model.base_model.update_and_allocate(step)
        model.zero_grad()
    model.eval()


LLAMA_CASES = {
    "lora": (peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_ALL), None),
    "fan_in_fan_out_flag_on_linear": (peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], fan_in_fan_out=True),
                                      None),  # peft ignores the flag on nn.Linear (square weights: must not transpose)
    "rslora_patterns": (peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                                        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                                        alpha_pattern={"down_proj": 3}), None),
    "embedding_and_head": (peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]), None),
    "dora": (peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj", "embed_tokens"]),
             None),
    "dora_rslora": (peft.LoraConfig(r=4, lora_alpha=16, use_dora=True, use_rslora=True, target_modules=["v_proj"]), None),
    "modules_to_save": (peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head", "norm"]), None),
    "adalora_pruned": (peft.AdaLoraConfig(init_r=6, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=4,
                                          lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]), adalora_allocate),
    "vera": (peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]), None),
    "vera_regenerated_projection": (peft.VeraConfig(r=4, target_modules=["q_proj", "down_proj"], save_projection=False,
                                                    projection_prng_key=7), None),
    "ia3": (peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), None),
    "loha": (peft.LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2},
                             alpha_pattern={"q_proj": 3}), None),
    "lokr": (peft.LoKrConfig(r=4, alpha=6, target_modules=["q_proj", "up_proj"]), None),
    "lokr_decomposed": (peft.LoKrConfig(r=2, alpha=6, target_modules=["q_proj", "down_proj"], decompose_both=True,
                                        decompose_factor=4), None),
    "hira": (peft.HiraConfig(r=4, target_modules=["q_proj", "down_proj", "embed_tokens"]), None),
}


def assert_same_as_peft(surgeon_out: Path, reference: dict[str, torch.Tensor], base: Path,
                        report: Any = None) -> set[str]:
    """Every output tensor equals peft's bit for bit; returns the names that differ from the base.

    With ``report``: exactly the reported tensors may differ, and each reports its count of changed elements.
    """
    got = read_folder(surgeon_out)
    with Checkpoint.open(base) as ckpt:
        assert sorted(got) == sorted(ckpt.keys())
        changed = set()
        for name, tensor in got.items():
            ref = reference[name]
            assert tensor.dtype == ref.dtype and torch.equal(tensor, ref), name
            if not torch.equal(tensor, ckpt.get(name)):
                changed.add(name)
            if report is not None and name in {e.name for e in report.entries}:
                entry = next(e for e in report.entries if e.name == name)
                assert entry.changed == int((tensor != ckpt.get(name)).sum()), name
    if report is not None:
        assert changed and changed <= {e.name for e in report.entries}
        assert report.copied == report.tensors - len(report.entries)
    return changed


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_float32_equals_peft_bit_for_bit(case, tiny_llama, tmp_path):
    config, prepare = LLAMA_CASES[case]
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", config, prepare=prepare)
    report = merge(tiny_llama, [adapter], tmp_path / "out")
    assert_same_as_peft(tmp_path / "out", peft_merged(tiny_llama, [(adapter, 1.0)]), tiny_llama, report)


def test_adalora_case_really_has_pruned_ranks(tiny_llama, tmp_path):
    config, prepare = LLAMA_CASES["adalora_pruned"]
    adapter = make_adapter(tiny_llama, tmp_path / "adapter", config, prepare=prepare)
    with Checkpoint.open(adapter / "adapter_model.safetensors") as w:
        ranks = {w.info(k).shape[0] for k in w.keys() if k.endswith("lora_E")}
    assert max(ranks) < 6 and len(ranks) > 1


def test_two_weighted_lora_adapters_equal_peft(tiny_llama, tmp_path):
    a = make_adapter(tiny_llama, tmp_path / "a", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True,
                                                                  target_modules=["q_proj", "up_proj"]), seed=2)
    report = merge(tiny_llama, [f"{a}:0.7", (b, -0.3)], tmp_path / "out")
    assert [x["weight"] for x in report.adapters] == [0.7, -0.3]
    assert_same_as_peft(tmp_path / "out", peft_merged(tiny_llama, [(a, 0.7), (b, -0.3)]), tiny_llama)


def test_two_dora_adapters_take_the_norm_on_the_unmerged_base(tiny_llama, tmp_path):
    """Not bit for bit, stated: before merging the second DoRA adapter peft rebuilds W0 by unmerging the first
    (W1 / f1 - dW1) and merges it again, which adds rounding; surgeon takes W0 as stored. Against peft's own
    float64 merge, surgeon's float32 result is at least as close as peft's float32 one."""
    a = make_adapter(tiny_llama, tmp_path / "a", peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]), seed=1)
    b = make_adapter(tiny_llama, tmp_path / "b", peft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]), seed=2)
    report = merge(tiny_llama, [a, b], tmp_path / "out")
    got = read_folder(tmp_path / "out")
    ref32 = peft_merged(tiny_llama, [(a, 1.0), (b, 1.0)])
    ref64 = peft_merged(tiny_llama, [(a, 1.0), (b, 1.0)], dtype=torch.float64)
    assert [e.name for e in report.entries] == [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]
    for name, tensor in got.items():
        if name not in {e.name for e in report.entries}:
            assert torch.equal(tensor, ref32[name])
            continue
        ours, theirs = (tensor.double() - ref64[name]).abs(), (ref32[name].double() - ref64[name]).abs()
        assert ours.max() <= 4 * torch.finfo(torch.float32).eps * ref64[name].abs().max()
        assert ours.sum() <= theirs.sum() * 1.001, name


GPT2_CASES = {
    "lora_conv1d": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    "lora_conv1d_flag_unset": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
    "dora_conv1d": peft.LoraConfig(r=4, use_dora=True, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    "ia3_conv1d": peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                 fan_in_fan_out=True),
    "vera_conv1d": peft.VeraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    "hira_conv1d": peft.HiraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
}  # a LoRA on a tied wte / lm_head unties them (peft's merge_and_unload changes both): tests/test_merge_layouts.py


@pytest.mark.parametrize("case", sorted(GPT2_CASES))
def test_gpt2_conv1d_float32_equals_peft_bit_for_bit(case, tiny_gpt2, tmp_path):
    adapter = make_adapter(tiny_gpt2, tmp_path / "adapter", GPT2_CASES[case])
    report = merge(tiny_gpt2, [adapter], tmp_path / "out")
    reference = peft_merged(tiny_gpt2, [(adapter, 1.0)])
    assert_same_as_peft(tmp_path / "out", reference, tiny_gpt2, report)


BERT_CASES = {
    "lora_bias_modules_to_save": peft.LoraConfig(r=4, target_modules=["query", "value"], lora_bias=True,
                                                 task_type="SEQ_CLS"),
    "bias_lora_only": peft.LoraConfig(r=4, target_modules=["query", "dense"], bias="lora_only"),
    "embedding_dora": peft.LoraConfig(r=4, use_dora=True, target_modules=["word_embeddings", "key"]),
    "ia3_with_bias": peft.IA3Config(target_modules=["key", "output.dense"], feedforward_modules=["output.dense"]),
    "lokr": peft.LoKrConfig(r=4, target_modules=["query", "intermediate.dense"]),
}


@pytest.mark.parametrize("case", sorted(BERT_CASES))
def test_bert_float32_equals_peft_bit_for_bit(case, tiny_bert, tmp_path):
    adapter = make_adapter(tiny_bert, tmp_path / "adapter", BERT_CASES[case])
    report = merge(tiny_bert, [adapter], tmp_path / "out")
    assert_same_as_peft(tmp_path / "out", peft_merged(tiny_bert, [(adapter, 1.0)]), tiny_bert, report)
    if case == "lora_bias_modules_to_save":
        kinds = {e.name: e.operations for e in report.entries}
        assert kinds["classifier.weight"] == "replace(a0)"
        assert kinds["bert.encoder.layer.0.attention.self.query.bias"] == "lora_bias(a0)"


def test_adapter_for_task_model_onto_bare_base_maps_names(tiny_bert, tmp_path):
    """Trained on BertForSequenceClassification (keys bert.encoder...), merged into a saved bare BertModel."""
    from transformers import BertModel

    bare = save_model(BertModel.from_pretrained(tiny_bert), tmp_path / "bare")
    adapter = make_adapter(tiny_bert, tmp_path / "adapter", peft.LoraConfig(r=4, target_modules=["query", "value"]))
    merge(bare, [adapter], tmp_path / "out")
    reference = peft_merged(tiny_bert, [(adapter, 1.0)])
    names = {k: "bert." + k for k in read_folder(tmp_path / "out") if "bert." + k in reference}
    assert len(names) > 10
    got = read_folder(tmp_path / "out")
    for name, ref_name in names.items():
        assert torch.equal(got[name], reference[ref_name]), name


def test_adapter_for_bare_model_onto_task_base_adds_prefix(tiny_llama, tmp_path):
    """Trained on a bare LlamaModel (keys layers.0...), merged into LlamaForCausalLM (model.layers.0...)."""
    from transformers import LlamaModel

    bare = save_model(LlamaModel.from_pretrained(tiny_llama), tmp_path / "bare")
    adapter = make_adapter(bare, tmp_path / "adapter", peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    report = merge(tiny_llama, [adapter], tmp_path / "out")
    reference = peft_merged(bare, [(adapter, 1.0)])
    got = read_folder(tmp_path / "out")
    assert report.merged == 4
    for name in reference:
        assert torch.equal(got["model." + name], reference[name]), name
    assert torch.equal(got["lm_head.weight"], load_model(tiny_llama).lm_head.weight)


def test_classifier_adapter_onto_bare_base_says_how_to_make_the_task_base(tiny_bert, tmp_path):
    """A SEQ_CLS adapter carries its head (modules_to_save); a bare BertModel has none. The refusal names the
    fix, and following it (save the task model from the bare base, merge onto that) gives peft's merge."""
    from transformers import BertForSequenceClassification, BertModel

    from surgeon.errors import AdapterError

    bare = save_model(BertModel.from_pretrained(tiny_bert), tmp_path / "bare")
    adapter = make_adapter(tiny_bert, tmp_path / "adapter",
                           peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    with pytest.raises(AdapterError) as err:
        merge(bare, [adapter], tmp_path / "out")
    message = str(err.value)
    assert "classifier" in message and "AutoModelForSequenceClassification" in message and "num_labels=2" in message
    assert not (tmp_path / "out").exists()
    task_base = save_model(BertForSequenceClassification.from_pretrained(bare, num_labels=2), tmp_path / "task")
    merge(task_base, [adapter], tmp_path / "out")
    reference = peft_merged(tiny_bert, [(adapter, 1.0)])
    got = read_folder(tmp_path / "out")
    changed = [n for n in got if "classifier" in n or "query" in n or "value" in n]
    assert len(changed) > 4
    for name in changed:  # the merged layers and the adapter's head; the rest is the (same) bare model
        assert torch.equal(got[name], reference[name]), name
