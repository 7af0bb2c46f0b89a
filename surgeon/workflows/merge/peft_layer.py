"""One module merged by peft's own layer code, without a model.

For a ``peft_module`` operation: rebuild just that base layer from its tensors (Linear, GPT-2
Conv1D, Embedding, Conv1d/2d/3d, LayerNorm, MultiheadAttention, or a bare holder of parameters
for ``target_parameters``) under its own path in an otherwise empty module tree, let peft wrap it
with the adapter's config, load that module's adapter tensors (and the shared ones), call peft's
``merge_and_unload()`` and read the layer's tensors back. Memory: one module. Correct by
construction for every tuner peft merges, including the ones it adds later; what peft refuses
to merge is refused with its reason.

The layer type is not stored in a checkpoint: candidates are tried in order of likelihood and
the first whose adapter parameters peft creates with the saved shapes is taken (a Conv2d's groups,
a Linear against a GPT-2 Conv1D).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from surgeon.errors import UnsupportedAdapterError
from surgeon.workflows.merge.module_plan import SHARED_ROLE
from surgeon.workflows.merge.plan import CONV1D_MODEL_TYPES, MergeOp, MergePlan

_EMBEDDING_NAMES = {"emb", "embed", "embedding", "embeddings", "embed_tokens", "wte", "wpe", "word_embeddings",
                    "embed_in", "shared", "tok_embeddings", "embed_positions", "position_embeddings",
                    "token_type_embeddings", "lm_head"}


class _Params(nn.Module):
    """A layer that is only its parameters (what ``target_parameters`` reaches, e.g. fused MoE experts)."""


def _on_meta(make: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return make()


def _load(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module | None:
    """``layer`` holding exactly ``tensors`` (by name); None when its parameters are named or shaped otherwise."""
    own = layer.state_dict()
    if set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
        return None
    layer.load_state_dict({k: v.clone() for k, v in tensors.items()}, assign=True)
    return layer


def _params_holder(tensors: dict[str, torch.Tensor]) -> nn.Module:
    root = _Params()
    for name, value in tensors.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, _Params())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(value.clone()))
    return root


def _conv(weight: torch.Tensor, groups: int, bias: bool) -> nn.Module:
    cls = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[weight.dim()]
    out, per_group, *kernel = weight.shape
    return _on_meta(lambda: cls(per_group * groups, out, tuple(kernel), groups=groups, bias=bias))


def _mha(tensors: dict[str, torch.Tensor]) -> nn.Module:
    embed = tensors["out_proj.weight"].shape[0]
    kdim = tensors["k_proj_weight"].shape[1] if "k_proj_weight" in tensors else embed
    vdim = tensors["v_proj_weight"].shape[1] if "v_proj_weight" in tensors else embed
    return _on_meta(lambda: nn.MultiheadAttention(embed, 1, bias="in_proj_bias" in tensors, kdim=kdim, vdim=vdim,
                                                  add_bias_kv="bias_k" in tensors))


def layer_candidates(tensors: dict[str, torch.Tensor], *, name: str, conv1d_first: bool,
                     embedding: bool) -> Iterator[nn.Module]:
    """Base layers that hold exactly ``tensors``, the likeliest first."""
    weight, bias = tensors.get("weight"), "bias" in tensors
    if "out_proj.weight" in tensors and ("in_proj_weight" in tensors or "q_proj_weight" in tensors):
        yield _mha(tensors)
    elif weight is not None and weight.dim() >= 3:
        out, per_group = weight.shape[:2]
        for groups in (g for g in range(1, out + 1) if out % g == 0):
            yield _conv(weight, groups, bias)
    elif weight is not None and weight.dim() == 1:
        yield _on_meta(lambda: nn.LayerNorm(weight.shape[0], bias=bias))
    elif weight is not None and weight.dim() == 2:
        from transformers.pytorch_utils import Conv1D

        rows, cols = weight.shape
        kinds = {"linear": lambda: nn.Linear(cols, rows, bias=bias), "conv1d": lambda: Conv1D(cols, rows),
                 "embedding": lambda: nn.Embedding(rows, cols)}
        order = ["conv1d", "linear"] if conv1d_first else ["linear", "conv1d"]
        order = ["embedding", *order] if embedding or name.rsplit(".", 1)[-1] in _EMBEDDING_NAMES else [*order, "embedding"]
        for kind in order:
            if kind == "embedding" and bias or kind == "conv1d" and not bias:
                continue
            yield _on_meta(kinds[kind])
    yield _params_holder(tensors)


def _skeleton(path: str, layer: nn.Module) -> nn.Module:
    """An otherwise empty module tree with ``layer`` at ``path``."""
    root = nn.Module()
    node = root
    *parents, leaf = path.split(".")
    for part in parents:
        child = nn.Module()
        node.add_module(part, child)
        node = child
    node.add_module(leaf, layer)
    return root


def module_config(raw: dict[str, Any], path: str, roles: set[str]) -> Any:
    """The adapter's peft config for one module: no modules_to_save (surgeon replaces those tensors itself),
    no task head; trainable tokens only on the module they belong to."""
    import peft

    cfg = {k: v for k, v in raw.items() if k not in ("modules_to_save", "task_type", "inference_mode")}
    tokens = cfg.get("trainable_token_indices")
    token_roles = any(r.startswith("token_adapter.") for r in roles)
    if token_roles and all(r.startswith("token_adapter.") for r in roles):
        indices = tokens.get(path.rsplit(".", 1)[-1], tokens.get(path)) if isinstance(tokens, dict) else tokens
        return peft.TrainableTokensConfig(target_modules=[path], token_indices=list(indices or []))
    if tokens is not None and not token_roles:
        cfg["trainable_token_indices"] = None
    return peft.PeftConfig.from_peft_type(**copy.deepcopy(cfg))


def _adapter_tensors(plan: MergePlan, op: MergeOp) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the module's tensors by peft key, the shared tensors by peft key), float32 as peft would hold them."""
    weights = plan.adapters[op.adapter].weights
    local, shared = {}, {}
    for role, key in op.tensors.items():
        value = weights.get(key)
        value = value.float() if value.is_floating_point() else value
        (shared if role.startswith(SHARED_ROLE) else local)[key] = value
    if any(r.startswith("token_adapter.") for r in op.tensors) and \
            all(r.startswith("token_adapter.") for r in op.tensors if not r.startswith(SHARED_ROLE)):
        local = {k.replace(".token_adapter.", "."): v for k, v in local.items()}
    return local, shared


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    node = model.get_submodule(".".join(path)) if path else model
    if leaf in node._parameters:
        node._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        node._buffers[leaf] = value


def _peft_model(layer: nn.Module, op: MergeOp, config: Any, local: dict[str, torch.Tensor],
                shared: dict[str, torch.Tensor]) -> Any:
    """peft wrapping ``layer`` at the module's path with the adapter loaded; None when the adapter parameters
    peft creates for this layer are shaped otherwise than the saved ones (a wrong layer candidate)."""
    import peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = peft.get_peft_model(_skeleton(op.module, layer), config)
        except (ValueError, TypeError, RuntimeError, NotImplementedError):
            return None
        expected = get_peft_model_state_dict(model)
    prefix = f"base_model.model.{op.module}."
    created = {k: v.shape for k, v in expected.items() if k.startswith(prefix)}
    if created != {k: v.shape for k, v in local.items()}:
        return None
    by_saved = {k.replace(".default", ""): k for k in model.state_dict()}
    loadable = dict(local)
    for key, value in shared.items():
        own = by_saved.get(key)
        if own is not None and own in model.state_dict() and model.state_dict()[own].shape == value.shape:
            loadable[key] = value
        elif own is not None:
            _assign(model, own, value)
    set_peft_model_state_dict(model, loadable)
    return model


def merge_module(plan: MergePlan, op: MergeOp, base_module: str, current: dict[str, torch.Tensor],
                 unmerged: dict[str, torch.Tensor], *, base_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The module's base tensors (float32, by base name) after peft merged ``op``'s adapter module into them.
    ``unmerged``: the tensors as the adapter was trained on them (peft initializes from these);
    ``current``: what earlier operations made of them (merged into)."""
    adapter = plan.adapters[op.adapter]
    where, kind = adapter.folder, adapter.config.peft_type
    rel = {n[len(base_module) + 1:]: n for n in op.group}
    local, shared = _adapter_tensors(plan, op)
    roles = {r for r in op.tensors if not r.startswith(SHARED_ROLE)}
    conv1d_first = base_config.get("model_type") in CONV1D_MODEL_TYPES or bool(adapter.config.raw.get("fan_in_fan_out"))
    embedding = any("embedding" in r or r.startswith(("token_adapter.", "trainable_tokens")) for r in roles)
    with torch.no_grad():
        for candidate in layer_candidates({r: unmerged[n] for r, n in rel.items()}, name=op.module,
                                          conv1d_first=conv1d_first, embedding=embedding):
            layer = _load(candidate, {r: unmerged[n].float() for r, n in rel.items()})
            if layer is None:
                continue
            held = layer.state_dict(keep_vars=True)
            model = _peft_model(layer, op, module_config(adapter.config.raw, op.module, roles), local, shared)
            if model is not None:
                break
        else:
            shapes = ", ".join(f"{k.removeprefix('base_model.model.')} {list(v.shape)}" for k, v in list(local.items())[:3])
            raise UnsupportedAdapterError(
                f"{where}: peft builds no {kind} layer on base module {base_module!r} "
                f"({', '.join(f'{r} {list(unmerged[n].shape)}' for r, n in rel.items())}) with the saved adapter "
                f"shapes ({shapes}); the adapter was trained on a different model. Merge it onto that model."
            )
        for r, n in rel.items():
            if current[n] is not unmerged[n]:
                held[r].data.copy_(current[n])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                merged = model.merge_and_unload().get_submodule(op.module)
        except (NotImplementedError, ValueError, RuntimeError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedAdapterError(
                f"{where}: peft cannot merge this {kind} adapter into module {op.module!r} ({reason.rstrip('.')}); "
                "use the adapter unmerged with peft."
            ) from None
        state = merged.state_dict()
    if set(state) != set(rel):
        raise UnsupportedAdapterError(
            f"{where}: peft's merge of module {op.module!r} leaves tensors {sorted(state)}, not the base's "
            f"{sorted(rel)}; surgeon writes the base's tensors only. Use the adapter unmerged with peft."
        )
    out = {}
    for r, n in rel.items():
        value = state[r].detach().float()
        out[n] = value if op.weight == 1.0 else current[n] + op.weight * (value - current[n])
    return out
