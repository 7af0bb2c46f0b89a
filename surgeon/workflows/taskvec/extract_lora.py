"""`surgeon extract-lora`: a PEFT LoRA adapter from τ = θ_tuned − θ_base by truncated SVD.

Every *changed* tensor (see :mod:`surgeon.ops.task_vector`; identical and
rounding-only tensors are left alone) is handled in one streamed pass:

* the weight of a Linear, GPT-2 Conv1D or Embedding module matching ``targets``
  becomes LoRA factors: B = U_k·√S_k, A = √S_k·V_kᵀ with alpha = k (scaling 1),
  k fixed (``rank``) or the smallest holding ``energy`` of ‖τ‖²; Conv1D (in × out)
  and Embedding (num × dim) factor τᵀ, as peft applies their ΔW transposed;
* any other changed tensor's module goes whole into ``modules_to_save`` (copied
  byte for byte from the tuned model), or is listed as dropped when that is off,
  when the module is itself a LoRA target (its bias), or when it is not a module.

Module types come from the tensor names for the model types in ``NAMED_LAYOUTS`` (each checked
against transformers' own classes in tests/test_extract_lora_kinds.py), otherwise from the model
class named in config.json, built on the meta device (no weights; seconds of imports); without a
usable class they are guessed from tensor names.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from surgeon.errors import IncompatibleInputError, OptionError
from surgeon.io.adapter_writer import AdapterWritten, SavedTensor, write_lora_adapter
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.resolve import resolve_path
from surgeon.io.roles import refuse_adapter
from surgeon.io.writer import check_output
from surgeon.ops.lora_extract import LoraFactors, factorize
from surgeon.ops.task_vector import CHANGED, is_float_dtype, measure_delta
from surgeon.ops.threads import one_cpu_thread
from surgeon.parallel.exchange import collect, device_for, plan_share, run_share
from surgeon.parallel.share import svd_cost
from surgeon.parallel.world import SOLO, World
from surgeon.progress import progress
from surgeon.provenance import provenance
from surgeon.workflows.convert import parse_dtype
from surgeon.workflows.taskvec.diff import load_pair, pair_tensors, pick_device

LORA_KINDS = ("linear", "conv1d", "embedding")
_EMBEDDING_NAMES = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|shared)")
_CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
# Model types whose every module with a 2-D weight is a Linear, or an Embedding / Conv1D that
# guess_kind tells by its name: for these the names decide, without building transformers' model class.
NAMED_LAYOUTS = frozenset({
    "bert", "roberta", "xlm-roberta", "distilbert",
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "olmo",
    "gpt2", "gpt_neox", "gptj", "opt", "falcon", "starcoder2",
})  # not electra (embeddings_project is a Linear), mpnet/t5 (relative_attention_bias is an Embedding),
#     mixtral/qwen2_moe (the router "gate" is no Linear): the check in the tests fails for each


@dataclass(frozen=True)
class MatrixFactor:
    """One LoRA module: τ's shape as stored, the rank kept and how well B·A reproduces τ."""

    module: str
    kind: str
    shape: list[int]
    rank: int
    relative_error: float  # ‖τ − ΔW_lora‖_F / ‖τ‖_F
    energy: float  # share of ‖τ‖² kept
    method: str = "exact"  # "randomized" (default route) or "exact" (--exact, or where the bounds do not decide)
    passes: int = 0  # products with τ or τᵀ on the randomised route
    computed_by_rank: int = 0


@dataclass(frozen=True)
class Dropped:
    name: str
    reason: str


@dataclass(frozen=True)
class ExtractReport:
    tuned: str
    base: str
    output: str
    rank: int | None
    energy: float | None
    module_types: str  # "transformers" (from the model class), "<model type> layout" (names of a known layout), "names" (guessed)
    modules: list[MatrixFactor]
    modules_to_save: list[str]
    dropped: list[Dropped]
    max_relative_error: float
    adapter: AdapterWritten | None
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def module_kinds(ckpt: Checkpoint) -> tuple[dict[str, str], str]:
    """({module name: linear|conv1d|embedding|other}, source) for the checkpoint's model class; ({}, source)
    where the names decide (a model type of NAMED_LAYOUTS, or no usable class)."""
    config = ckpt.config() or {}
    if config.get("model_type") in NAMED_LAYOUTS:
        return {}, f"{config['model_type']} layout"
    arch = (config.get("architectures") or [None])[0]
    if not arch:
        return {}, "names"
    try:
        import transformers

        cls = getattr(transformers, arch)
        cfg = transformers.AutoConfig.from_pretrained(ckpt.folder, local_files_only=True)
        with torch.device("meta"):
            model = cls(cfg)
    except Exception:  # unknown or remote-code architecture, odd config: fall back to names
        return {}, "names"
    return {name: kind_of(module) for name, module in model.named_modules()}, "transformers"


def kind_of(module: torch.nn.Module) -> str:
    """linear | conv1d | embedding | other, by the module's class (what peft's LoRA can wrap)."""
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return "conv1d" if type(module).__name__ == "Conv1D" else "other"


def guess_kind(module: str, model_type: str | None) -> str:
    """Module type from its name alone (no usable model class)."""
    leaf = module.rsplit(".", 1)[-1]
    if _EMBEDDING_NAMES.search(leaf):
        return "embedding"
    if model_type in _CONV1D_MODEL_TYPES and leaf in ("c_attn", "c_proj", "c_fc"):
        return "conv1d"
    return "linear"


def _validate(rank: int | None, energy: float | None, max_rank: int | None, targets: str | None) -> re.Pattern[str] | None:
    if (rank is None) == (energy is None):
        raise OptionError("give exactly one of -r/--rank R or --energy F (e.g. -r 16 or --energy 0.99).")
    if rank is not None and rank < 1:
        raise OptionError(f"-r/--rank must be at least 1, got {rank}.")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise OptionError(f"--energy must be in (0, 1], got {energy}; 0.99 keeps 99% of ‖τ‖².")
    if max_rank is not None and max_rank < 1:
        raise OptionError(f"--max-rank must be at least 1, got {max_rank}.")
    if targets is None:
        return None
    try:
        return re.compile(targets)
    except re.error as exc:
        raise OptionError(f"--targets {targets!r} is not a valid regular expression ({exc}); escape special "
                          "characters, e.g. --targets 'layers\\.\\d+\\..*proj'.") from None


@dataclass
class _State:
    factors: dict[str, tuple[str, LoraFactors, list[int]]]
    leftovers: dict[str, list[str]]
    dropped: list[Dropped]


def _lora_candidates(tuned: Checkpoint, base: Checkpoint, names: list[str], kinds: dict[str, str], source: str,
                     pattern: re.Pattern[str] | None) -> dict[str, tuple[str, str]]:
    """{tensor name: (module, kind)} for weights that may become LoRA factors."""
    model_type = (tuned.config() or {}).get("model_type")
    out = {}
    for name in names:
        info = tuned.info(name)
        if not name.endswith(".weight") or len(info.shape) != 2 or not is_float_dtype(info.torch_dtype):
            continue
        if not is_float_dtype(base.info(name).torch_dtype):
            continue
        module = name[: -len(".weight")]
        if source == "pending":  # the module types are still being found: factor it as a Linear, settle later
            kind = "linear"
        else:
            kind = kinds.get(module, "other") if source == "transformers" else guess_kind(module, model_type)
        if kind in LORA_KINDS and (pattern is None or pattern.search(module)):
            out[name] = (module, kind)
    return out


def _settle_kinds(state: _State, by_rank: dict[str, int], kinds: dict[str, str], source: str,
                  model_type: str | None) -> None:
    """Give each factored module (factored as a Linear while the module types were found) its type: a
    Conv1D/Embedding gets the factors of τᵀ = Aᵀ·Bᵀ (peft applies their deltas transposed);
    a weight of no LoRA-able module goes back to the tensors stored whole or dropped."""
    for module, (_, f, shape) in list(state.factors.items()):
        kind = kinds.get(module, "other") if source == "transformers" else guess_kind(module, model_type)
        if kind not in LORA_KINDS:
            del state.factors[module]
            by_rank.pop(module, None)
            state.leftovers.setdefault(module, []).append(module + ".weight")
        elif kind != "linear":
            state.factors[module] = (kind, replace(f, A=f.B.T.contiguous(), B=f.A.T.contiguous()), shape)


def _read_ahead(tuned: Checkpoint, base: Checkpoint, names: list[str]
                ) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor, bool]]]:
    """(name, load_pair(...)) in order, the next pair read on a thread while this one is factored."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="surgeon-read") as pool:
        pending = pool.submit(load_pair, tuned, base, names[0]) if names else None
        for i, name in enumerate(names):
            pair = pending.result()  # type: ignore[union-attr]
            pending = pool.submit(load_pair, tuned, base, names[i + 1]) if i + 1 < len(names) else None
            yield name, pair


def _scan(tuned: Checkpoint, base: Checkpoint, names: list[str], candidates: dict[str, tuple[str, str]],
          rank: int | None, energy: float | None, max_rank: int | None, device: str, exact: bool,
          world: World = SOLO) -> tuple[_State, dict[str, int]]:
    """Factor the changed candidates and list the other changed tensors; on a process group each rank
    reads and factors its share (SVD cost for candidates, bytes for the rest) and all get the whole
    state. Returns it with the rank that computed each factored module."""
    costs = [svd_cost(*tuned.info(n).shape) if n in candidates else float(tuned.info(n).nbytes) for n in names]
    part = plan_share(world, costs)
    mine = [names[i] for i in part.mine]
    stream = progress(_read_ahead(tuned, base, mine), total=len(mine), desc="extract-lora")
    with one_cpu_thread(device):  # the reader and module-type threads use the other core
        run_share(part, mine, (_scan_one(name, pair, candidates, rank, energy, max_rank, device, exact)
                               for name, pair in stream))
    state = _State({}, {}, [])
    by_rank: dict[str, int] = {}
    for name, owner, found in zip(names, part.owners, collect(part, encode=_wire, decode=_unwire)):
        if found is None:
            continue
        if found[0] == "factor":
            _, module, kind, f, shape = found
            state.factors[module] = (kind, f, shape)
            by_rank[module] = owner
        else:
            state.leftovers.setdefault(found[1], []).append(name)
    return state, by_rank


def _scan_one(name: str, pair: tuple[torch.Tensor, torch.Tensor, bool], candidates: dict[str, tuple[str, str]],
              rank: int | None, energy: float | None, max_rank: int | None, device: str,
              exact: bool) -> tuple[Any, ...] | None:
    t, b, same = pair
    if same:
        return None
    delta, measure = measure_delta(t, b, t.dtype)
    if measure.status != CHANGED:
        return None
    if name in candidates:
        module, kind = candidates[name]
        f = factorize(delta, rank=rank, energy=energy, max_rank=max_rank, device=device, exact=exact)
        return ("factor", module, kind, f, list(delta.shape))
    return ("leftover", name.rsplit(".", 1)[0] if "." in name else "")


def _tensor_wire(x: torch.Tensor) -> dict[str, Any]:
    x = x.detach().cpu().contiguous()
    return {"dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape),
            "data": base64.b64encode(x.numpy().tobytes()).decode("ascii")}


def _tensor_unwire(d: dict[str, Any]) -> torch.Tensor:
    raw = bytearray(base64.b64decode(d["data"]))
    flat = torch.frombuffer(raw, dtype=getattr(torch, d["dtype"])) if raw else torch.empty(0, dtype=getattr(torch, d["dtype"]))
    return flat.reshape(d["shape"]).clone()


def _wire(found: tuple[Any, ...] | None) -> Any:
    """One scan result as JSON data; factor tensors as their exact bytes (base64)."""
    if found is None or found[0] == "leftover":
        return found
    _, module, kind, f, shape = found
    values = {fl.name: getattr(f, fl.name) for fl in fields(f)}
    return ["factor", module, kind, {k: _tensor_wire(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()},
            shape]


def _unwire(data: Any) -> tuple[Any, ...] | None:
    if data is None or data[0] == "leftover":
        return None if data is None else tuple(data)
    _, module, kind, wired, shape = data
    values = {k: (_tensor_unwire(v) if isinstance(v, dict) and "data" in v else v) for k, v in wired.items()}
    return ("factor", module, kind, LoraFactors(**values), shape)


def _saved_modules(tuned: Checkpoint, state: _State, kinds: dict[str, str], source: str,
                   keep: bool) -> dict[str, dict[str, SavedTensor]]:
    """Modules stored whole; what cannot be stored goes to ``state.dropped``."""
    saved: dict[str, dict[str, SavedTensor]] = {}
    for module, names in state.leftovers.items():
        if module in state.factors:
            reason = "belongs to a LoRA target module; LoRA carries no bias delta"
        elif not keep:
            reason = "modules_to_save is off"
        elif not module or (source == "transformers" and module not in kinds):
            reason = "not a parameter of a module"
        else:
            params = [n for n in tuned.keys() if n.startswith(module + ".") and "." not in n[len(module) + 1:]]
            saved[module] = {n[len(module) + 1:]: (tuned, n) for n in params}
            continue
        state.dropped.extend(Dropped(n, reason) for n in names)
    return saved


def _refuse_empty(tuned: str, base: str, state: _State, targets: str | None) -> None:
    """No LoRA module to write: peft cannot load an adapter that targets nothing."""
    others = [n for names in state.leftovers.values() for n in names]
    if not others:
        raise IncompatibleInputError(
            f"{tuned}: no tensor changed beyond rounding against {base}, so there is nothing to extract; "
            "check that TUNED and BASE are not the same model."
        )
    which = "matches --targets" if targets else "is a Linear, Conv1D or Embedding weight"
    raise IncompatibleInputError(
        f"{tuned}: {len(others)} tensor(s) changed (e.g. {others[0]!r}) but none {which}, and peft cannot load "
        "an adapter without a LoRA module; carry these changes with `surgeon diff -o TV` and `surgeon apply`."
    )


def extract_lora(
    tuned: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    targets: str | None = None,
    modules_to_save: bool = True,
    dtype: str | None = "fp32",
    device: str | None = "auto",
    overwrite: bool = False,
    exact: bool = False,
    world: World = SOLO,
) -> ExtractReport:
    """Write a PEFT LoRA adapter for ``base`` that reproduces ``tuned`` (see module docstring).

    ``targets`` is a regular expression searched in module names (anchor it with ^…$);
    by default every Linear / Conv1D / Embedding weight that changed is factored. ``exact``:
    every factor from the full float64 decomposition instead of the randomised SVD.
    """
    pattern = _validate(rank, energy, max_rank, targets)
    st = parse_dtype(dtype) or "F32"
    tuned_path, base_path = resolve_path(tuned), resolve_path(base)
    refuse_adapter(tuned_path, expected="a fine-tuned model", fix="it already is a LoRA: change its rank with "
                   "`surgeon combine ADAPTER --method svd --svd-rank R`, or merge it with `surgeon merge`")
    refuse_adapter(base_path, expected="a base model", fix="give the base model the fine-tune started from")
    with ExitStack() as stack:
        t_ckpt = stack.enter_context(Checkpoint.open(tuned_path))
        b_ckpt = stack.enter_context(Checkpoint.open(base_path))
        if world.is_main:  # rank 0 alone writes (and locks) the output
            check_output(Path(out), [tuned_path, base_path], overwrite=overwrite)  # before the SVDs, not after
        pairs = pair_tensors(t_ckpt, b_ckpt)
        names = [n for n in pairs.common
                 if is_float_dtype(t_ckpt.info(n).torch_dtype) and is_float_dtype(b_ckpt.info(n).torch_dtype)]
        # the module types (a meta model of transformers' class: seconds of imports) are found on a thread
        # while the factoring runs; every 2-D weight is factored as a Linear meanwhile and settled after
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="surgeon-kinds") as pool:
            found_kinds = pool.submit(module_kinds, t_ckpt)
            candidates = _lora_candidates(t_ckpt, b_ckpt, names, {}, "pending", pattern)
            state, by_rank = _scan(t_ckpt, b_ckpt, names, candidates, rank, energy, max_rank,
                                   pick_device(device_for(world, device or "auto")), exact, world)
            kinds, source = found_kinds.result()
        _settle_kinds(state, by_rank, kinds, source, (t_ckpt.config() or {}).get("model_type"))
        saved = _saved_modules(t_ckpt, state, kinds, source, modules_to_save)
        factors = {m: (f.A, f.B) for m, (_, f, _) in state.factors.items() if f.rank > 0}
        if not factors:
            _refuse_empty(str(tuned), str(base), state, targets)
        matrices = [MatrixFactor(m, kind, shape, f.rank, f.relative_error, f.energy, f.method, f.passes, by_rank[m])
                    for m, (kind, f, shape) in state.factors.items()]
        record = provenance("extract-lora", {"rank": rank, "energy": energy, "max_rank": max_rank, "targets": targets,
                                             "modules_to_save": modules_to_save, "dtype": st,
                                             "exact": exact},
                            inputs={"tuned": str(tuned), "base": str(base)})
        summary = {"modules": [asdict(m) for m in matrices], "dropped": [asdict(d) for d in state.dropped]}
        if not world.is_main:  # rank 0 writes the adapter (the factors are small: they came to every rank)
            return _report(tuned, base, out, rank, energy, source, matrices, saved, state, None, world)
        written = write_lora_adapter(
            out, factors, base_model_name_or_path=str(base),
            embedding_modules=[m for m, (kind, _, _) in state.factors.items() if kind == "embedding"],
            modules_to_save=saved, fan_in_fan_out=any(k == "conv1d" for k, _, _ in state.factors.values()),
            dtype=st, record=record, report=summary, inputs=[tuned_path, base_path], overwrite=overwrite,
        )
    return _report(tuned, base, out, rank, energy, source, matrices, saved, state, written, world)


def _report(tuned: Any, base: Any, out: Any, rank: int | None, energy: float | None, source: str,
            matrices: list[MatrixFactor], saved: dict[str, Any], state: _State, written: AdapterWritten | None,
            world: World) -> ExtractReport:
    return ExtractReport(
        tuned=str(tuned), base=str(base), output=str(Path(out)), rank=rank, energy=energy, module_types=source,
        modules=matrices, modules_to_save=sorted(saved), dropped=state.dropped,
        max_relative_error=max((m.relative_error for m in matrices), default=0.0), adapter=written,
        world_size=world.size,
    )
