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
from surgeon.ops.threads import torch_threads
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


def _skeleton(layers: dict[str, nn.Module]) -> nn.Module:
    """An otherwise empty module tree with each layer at its path (in the given order)."""
    root = nn.Module()
    for path, layer in layers.items():
        node = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
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


def _adapter_name(i: int) -> str:
    return f"surgeon{i}"


def _load_adapter(model: Any, i: int, op: MergeOp, local: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]
                  ) -> bool:
    """Load adapter ``i``'s saved tensors into ``model``; False when peft created other parameters for this layer
    (other names or shapes: a wrong layer candidate). Tensors peft sized from the whole
    model (shared projections, bases) are put in place as saved."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    name = _adapter_name(i)
    prefix = f"base_model.model.{op.module}."
    created = {k: v.shape for k, v in get_peft_model_state_dict(model, adapter_name=name).items() if k.startswith(prefix)}
    saved = {k: v.shape for k, v in local.items()}
    if created != saved:
        return False
    state = model.state_dict()
    own = {k.replace(f".{name}", ""): k for k in state if f".{name}" in k}
    loadable = {**local, **shared}
    for key, value in loadable.items():
        if key in own and (key in shared or state[own[key]].shape != value.shape):
            _assign(model, own[key], value.clone())  # then loaded like the rest (peft checks they are there)
    try:
        set_peft_model_state_dict(model, loadable, adapter_name=name)
    except (ValueError, RuntimeError, KeyError):
        return False
    return True


def _peft_model(layers: dict[str, nn.Module], ops: list[MergeOp], configs: list[Any],
                tensors: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]) -> Any:
    """peft wrapping the layers with every op's adapter loaded and active; None for a wrong layer candidate."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = peft.get_peft_model(_skeleton(layers), configs[0], adapter_name=_adapter_name(0))
            for i, config in enumerate(configs[1:], 1):
                model.add_adapter(_adapter_name(i), config)
        except (ValueError, TypeError, RuntimeError, NotImplementedError, KeyError):
            return None
        for i, op in enumerate(ops):
            if not _load_adapter(model, i, op, *tensors[i]):
                return None
        if len(ops) > 1:
            model.base_model.set_adapter([_adapter_name(i) for i in range(len(ops))])
    return model


def _wrapped(layer: nn.Module, path: str, others: dict[str, nn.Module], siblings: dict[str, Any] | None,
             ops: list[MergeOp], configs: list[Any], tensors: list[Any]) -> Any:
    """peft around ``layer`` (and its shapes-only siblings): the model's order first (TinyLoRA numbers modules
    by it), then this layer first (RandLoRA makes its shared bases on the first layer's device, which must
    not be a shapes-only one). None when this layer is the wrong candidate."""
    orders = [{p: others.get(p, layer) for p in siblings or {path: None}}]
    if others:
        orders.append({path: layer, **others})
    for layers in orders:
        model = _peft_model(layers, ops, configs, tensors)
        if model is not None:
            return model
    return None


def _siblings(siblings: dict[str, dict[str, tuple[int, ...]]], conv1d_first: bool) -> dict[str, nn.Module]:
    """The adapter's other modules as shapes only (meta tensors): tuners that number or size their
    parameters across the whole model (TinyLoRA, UniLoRA, RandLoRA) see every module they saw in training."""
    layers = {}
    for path, shapes in siblings.items():
        meta = {r: torch.empty(shape, device="meta") for r, shape in shapes.items()}
        layer = next(layer_candidates(meta, name=path, conv1d_first=conv1d_first, embedding=False))
        layers[path] = _load(layer, meta) or _params_holder(meta)
    return layers


def _merged_layer(model: Any, path: str, *, alone: bool, threads: int) -> nn.Module:
    """The layer at ``path`` after peft's merge: ``merge_and_unload()`` when it is the only real layer, else
    that layer's own merge (its siblings are shapes only). Its few large products run on ``threads``
    threads; everything around them stays single-threaded (no per-op barrier on a busy machine)."""
    with torch_threads(threads):
        if alone:
            return model.merge_and_unload().get_submodule(path)
        layer = model.base_model.model.get_submodule(path)
        layer.merge(adapter_names=list(layer.active_adapters))
        return layer.get_base_layer()


def merge_module(plan: MergePlan, ops: list[MergeOp], base_module: str, current: dict[str, torch.Tensor],
                 unmerged: dict[str, torch.Tensor], *, base_config: dict[str, Any],
                 siblings: dict[str, dict[str, tuple[int, ...]]] | None = None,
                 threads: int = 1) -> dict[str, torch.Tensor]:
    """The module's base tensors (float32, by base name) after peft merged ``ops``' adapter modules into them
    (several: all active at once, as peft merges several active adapters). ``unmerged``: the tensors as the
    adapters were trained on them (peft initializes from these); ``current``: what earlier operations made of
    them. ``siblings``: the adapter's other modules (path -> tensor shapes), for tuners that need them."""
    op = ops[0]
    adapter = plan.adapters[op.adapter]
    where, kind = adapter.folder, adapter.config.peft_type
    rel = {n[len(base_module) + 1:]: n for n in op.group}
    tensors = [_adapter_tensors(plan, o) for o in ops]
    roles = [{r for r in o.tensors if not r.startswith(SHARED_ROLE)} for o in ops]
    configs = [module_config(plan.adapters[o.adapter].config.raw, o.module, roles[i]) for i, o in enumerate(ops)]
    conv1d_first = base_config.get("model_type") in CONV1D_MODEL_TYPES or bool(adapter.config.raw.get("fan_in_fan_out"))
    embedding = any("embedding" in r or r.startswith(("token_adapter.", "trainable_tokens")) for r in roles[0])
    others = _siblings({p: v for p, v in (siblings or {}).items() if p != op.module}, conv1d_first)
    model = held = None
    with torch.no_grad():
        for candidate in layer_candidates({r: unmerged[n] for r, n in rel.items()}, name=op.module,
                                          conv1d_first=conv1d_first, embedding=embedding):
            layer = _load(candidate, {r: unmerged[n].float() for r, n in rel.items()})
            if layer is not None:
                held = layer.state_dict(keep_vars=True)
                model = _wrapped(layer, op.module, others, siblings, ops, configs, tensors)
            if model is not None:
                break
        if model is None:
            shapes = ", ".join(f"{k.removeprefix('base_model.model.')} {list(v.shape)}"
                               for k, v in list(tensors[0][0].items())[:3])
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
                merged = _merged_layer(model, op.module, alone=not others, threads=threads)
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
