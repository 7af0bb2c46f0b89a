"""Which weight matrices a spectral command looks at: name presets and regexes.

Presets are resolved from tensor names of common architectures; the module path that
follows the layer index decides (``model.layers.3.self_attn.q_proj.weight`` ->
``self_attn.q_proj``):

=========== ===================================== ============================ ==========================
preset      Llama / Mistral / Qwen / Phi-3         GPT-2 (Conv1D, transposed)   BERT / RoBERTa / MiniLM
=========== ===================================== ============================ ==========================
qv          self_attn.q_proj, v_proj              attn.c_attn (fused q,k,v)    attention.self.query, value
attn        self_attn.{q,k,v,o,qkv}_proj           attn.c_attn, attn.c_proj     attention.self.*, attention.output.dense
mlp         mlp.{gate,up,down,gate_up}_proj        mlp.c_fc, mlp.c_proj         intermediate.dense, output.dense
all-linear  attn + mlp (no embeddings, no lm_head)
=========== ===================================== ============================ ==========================

Anything else given as ``--targets`` is a regular expression searched in each 2-D
tensor name. Pure name logic: no tensors, no files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PRESETS: dict[str, tuple[str, ...]] = {
    "qv": (r"self_attn\.(?:q|v)_proj", r"attention\.self\.(?:query|value)", r"attn\.c_attn"),
    "attn": (r"self_attn\.(?:q|k|v|o|qkv)_proj", r"attention\.self\.(?:query|key|value)", r"attention\.output\.dense",
             r"attn\.c_attn", r"attn\.c_proj"),
    "mlp": (r"mlp\.(?:gate|up|down|gate_up)_proj", r"intermediate\.dense", r"output\.dense", r"mlp\.c_fc",
            r"mlp\.c_proj"),
}
PRESETS["all-linear"] = PRESETS["attn"] + PRESETS["mlp"]
DEFAULT_PRESET = "all-linear"
# Architectures whose projections are transformers' Conv1D (weight stored in × out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
_CONV1D_NAMES = re.compile(r"\.(?:attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj|attn\.q_attn)\.weight$")
_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """One selected matrix: tensor ``name``, ``layer`` index (None if the name has none),
    ``module`` (the path after the layer index, e.g. ``self_attn.q_proj``), ``shape`` as
    stored and ``transposed`` (a Conv1D weight, analysed as its transpose)."""

    name: str
    layer: int | None
    module: str
    shape: tuple[int, int]
    transposed: bool

    @property
    def linear_shape(self) -> tuple[int, int]:
        """(out, in): the shape in nn.Linear orientation."""
        return (self.shape[1], self.shape[0]) if self.transposed else self.shape


class TargetSpecError(ValueError):
    """A --targets value that is neither a preset nor a valid regex (message is user-facing)."""


def layer_and_module(name: str) -> tuple[int | None, str]:
    """(layer index, module path after it without ``.weight``) for a tensor name."""
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    match = _LAYER.search(stem + ".")
    if match is None:
        return None, stem
    return int(match.group(1)), stem[match.end():].rstrip(".") or stem


def is_conv1d(name: str, model_type: str | None) -> bool:
    """True when ``name`` is a Conv1D weight (stored in × out): by config model_type, else by GPT-2 names."""
    if model_type is not None:
        return model_type in CONV1D_MODEL_TYPES and bool(_CONV1D_NAMES.search(name))
    return bool(_CONV1D_NAMES.search(name))


def compile_targets(spec: str) -> re.Pattern[str]:
    """The pattern for a preset name or a user regex; raises :class:`TargetSpecError`."""
    if spec in PRESETS:
        return re.compile(r"\.\d+\.(?:" + "|".join(PRESETS[spec]) + r")\.weight$")
    try:
        return re.compile(spec)
    except re.error as exc:
        raise TargetSpecError(
            f"--targets {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a valid regular expression ({exc})"
        ) from None


def select_targets(shapes: Mapping[str, Sequence[int]], spec: str = DEFAULT_PRESET, *,
                   model_type: str | None = None, floating: Mapping[str, bool] | None = None) -> list[Target]:
    """The 2-D floating tensors of ``shapes`` (name -> shape, in file order) that ``spec`` selects."""
    pattern = compile_targets(spec)
    out = []
    for name, shape in shapes.items():
        if len(shape) != 2 or (floating is not None and not floating.get(name, False)) or min(shape) == 0:
            continue
        if not pattern.search(name):
            continue
        layer, module = layer_and_module(name)
        out.append(Target(name, layer, module, (int(shape[0]), int(shape[1])), is_conv1d(name, model_type)))
    return out
