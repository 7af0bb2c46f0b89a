"""The continual demo's measurements: each model loaded once, read out with every earlier task's head.

After stage s the encoder of stage s is evaluated on every task t ≤ s with the head trained at
stage t (its ``classifier.*`` tensors copied into the loaded model in place of the model's own
head), so the forgetting measured is the encoder's. Drift is 1 − the mean cosine between the
model's and the base's sentence embeddings of the probe texts, as ``surgeon eval --drift-from``
measures it; the base's embeddings are computed once for the whole run. The metric code is
`surgeon eval`'s own (:func:`classification_metrics`, :func:`sentence_embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from surgeon.io.data import TaskData, load_task_data
from surgeon.workflows.demo.stages import HEAD
from surgeon.workflows.train.evaluate import classification_metrics, load_for_eval, sentence_embeddings
from surgeon.workflows.train.head import HeadTensors, read_head
from surgeon.workflows.train.textmodel import load_tokenizer, quiet_transformers

BATCH_SIZE = 64
DEVICE = torch.device("cpu")


@dataclass
class Reader:
    """What every measurement of one run shares: tokenizer, test sets, probe texts, the base's embeddings."""

    tokenizer: Any
    labels: list[list[str]]
    tests: list[TaskData]
    probe: list[str]
    max_length: int
    base: torch.Tensor | None = None
    heads: dict[Path, HeadTensors] = field(default_factory=dict)

    @property
    def sizes(self) -> dict[str, Any]:
        return {"batch_size": BATCH_SIZE, "max_length": self.max_length, "device": DEVICE}

    def load(self, model: Path, labels: list[str]) -> Any:
        return load_for_eval(model, None, "classification", labels=labels, device=DEVICE,
                             pad_token_id=self.tokenizer.pad_token_id)

    def head(self, model: Path) -> HeadTensors:
        if model not in self.heads:
            self.heads[model] = read_head(model)
        return self.heads[model]


def make_reader(tests: list[Path], labels: list[list[str]], probe: Path, base: Path, *, max_length: int) -> Reader:
    """The reader of one run (``tests[t]`` the test file of task t + 1): the base's probe embeddings computed here."""
    quiet_transformers()
    sets = [load_task_data(path, "classification", labels=names) for path, names in zip(tests, labels)]
    r = Reader(load_tokenizer(base), labels, sets, load_task_data(probe, "causal-lm").texts, max_length)
    r.base = sentence_embeddings(r.load(base, labels[0]), r.tokenizer, r.probe, **r.sizes)
    return r


def _install(net: Any, head: HeadTensors) -> None:
    """``net``'s classifier replaced by a linear layer holding ``head``'s tensors."""
    weight, bias = head.tensors[f"{HEAD}.weight"], head.tensors.get(f"{HEAD}.bias")
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    setattr(net, HEAD, layer.eval())


def measure(r: Reader, model: Path, stage: int, heads: list[Path]) -> tuple[list[float], float]:
    """Accuracy of ``model`` (trained through ``stage``, 1-based: its own head is that task's) on tasks
    1..len(heads), task t read out with the head of ``heads[t-1]``; and its drift from the base."""
    net = r.load(model, r.labels[stage - 1])
    accuracies = []
    for t, head in enumerate(heads, 1):
        _install(net, r.head(head))
        m = classification_metrics(net, r.tokenizer, r.tests[t - 1], r.labels[t - 1], **r.sizes)
        assert m.accuracy is not None
        accuracies.append(m.accuracy)
    tuned = sentence_embeddings(net, r.tokenizer, r.probe, **r.sizes)
    assert r.base is not None
    cos = F.cosine_similarity(tuned.double(), r.base.double(), dim=-1)  # as `surgeon eval --drift-from`
    return accuracies, 1.0 - float(cos.mean())
