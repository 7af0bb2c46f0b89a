"""Planning `surgeon combine`: peft's ``add_weighted_adapter`` rules, from adapter headers and configs only.

The rank rules and the result's config are peft's (``LoraModel._check_add_weighted_adapter`` and
``add_weighted_adapter``, peft 0.21): one adapter always combines ``linear``; ``linear``, ``ties``,
``dare_*`` and ``magnitude_prune`` need equal ranks and keep that rank; ``cat`` sums the ranks;
the ``_svd`` types take ``svd_rank`` or the largest rank. The result is the first adapter's config
with ``r = lora_alpha = new rank``, the union of the target modules and no rank/alpha patterns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from surgeon.errors import OptionError, UnsupportedAdapterError
from surgeon.io.adapter import ADAPTER_CONFIG, Adapter, adapter_layout, pattern_value

COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
EQUAL_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                 "magnitude_prune", "magnitude_prune_svd")
RANDOM = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")


@dataclass(frozen=True)
class CombineOptions:
    """peft's add_weighted_adapter arguments. ``svd_rank``: an int, or a float in (0, 1] (an energy fraction,
    only when converting one adapter); ``dtype``: auto (the first adapter's) or F32/F16/BF16."""

    method: str = "svd"
    density: float | None = None
    svd_rank: int | float | None = None
    svd_clamp: float | None = None
    majority_sign: str = "total"
    seed: int = 0
    dtype: str | None = None

    def parameters(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        if self.method in NEEDS_DENSITY:
            out["density"] = self.density
        if self.method.endswith("svd"):
            out.update(svd_rank=self.svd_rank, svd_clamp=self.svd_clamp)
        if self.method in ("ties", "ties_svd", "dare_ties", "dare_ties_svd"):
            out["majority_sign"] = self.majority_sign
        if self.method in RANDOM:
            out["seed"] = self.seed
        return out


@dataclass(frozen=True)
class Member:
    """One input adapter's LoRA factors for one module: tensor names, rank and scaling s = α/r (α/√r rsLoRA)."""

    adapter: int
    weight: float
    lora_A: str
    lora_B: str
    rank: int
    scaling: float


@dataclass(frozen=True)
class ModuleJob:
    """One output module: its path, whether it is an embedding, its factors' shapes and the inputs acting on it."""

    path: str
    embedding: bool
    rank: int
    features: tuple[int, int]  # (rows of B, columns of A): (out, in), or (dim, num_embeddings)
    members: tuple[Member, ...]

    @property
    def keys(self) -> tuple[str, str]:
        prefix = f"base_model.model.{self.path}"
        if self.embedding:
            return f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"
        return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


@dataclass(frozen=True)
class CombinePlan:
    method: str  # the combination actually run (linear for one adapter, as peft)
    new_rank: int
    config: dict[str, Any]
    modules: list[ModuleJob] = field(default_factory=list)
    carried: list[tuple[int, str]] = field(default_factory=list)  # (adapter, tensor) copied unchanged


@dataclass(frozen=True)
class CombineReport:
    output: str
    method: str  # as asked
    combination: str  # as run: linear for one adapter (peft), convert_to_lora for one adapter with svd
    adapters: list[dict[str, Any]]
    r: int
    lora_alpha: float
    modules: int
    parameters: dict[str, Any]
    bytes_written: int
    ranks: dict[str, int] = field(default_factory=dict)  # per module, when they differ (energy fraction)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _config_rank(adapter: Adapter) -> int:
    """peft's rank of an adapter for the rules: r, or the largest of r and its rank_pattern values."""
    raw = adapter.config.raw
    r = int(raw.get("r", 8))
    patterns = raw.get("rank_pattern") or {}
    return max(r, *map(int, patterns.values())) if patterns else r


def check_combinable(adapter: Adapter) -> None:
    """Only plain LoRA factors combine; say what to do with everything else."""
    cfg, where = adapter.config, adapter.folder / ADAPTER_CONFIG
    if cfg.peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{where}: peft_type {cfg.peft_type!r}: add_weighted_adapter combines LoRA adapters only; convert it to "
            f"a LoRA first: surgeon combine {adapter.folder} --method svd --svd-rank 16 --base BASE -o LORA_OUT.")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "lora_bias")):
        if cfg.raw.get(key):
            raise UnsupportedAdapterError(
                f"{where}: {key}=true: {what} adapters carry more than B·A, which add_weighted_adapter does not "
                "combine; merge them into the base with surgeon merge instead.")
    if cfg.raw.get("target_parameters"):
        raise UnsupportedAdapterError(f"{where}: target_parameters adapters cannot be combined (as in peft).")
    layout = adapter_layout(adapter.weights)
    embeddings = {f"{path}.weight" for path, m in layout.modules.items() if "lora_embedding_A" in m.tensors}
    whole = [f for f in layout.full if f.name not in embeddings]
    if whole:
        raise UnsupportedAdapterError(
            f"{where}: the adapter stores whole tensors ({whole[0].name}, modules_to_save or a trained bias), "
            "which combine cannot mix; save the adapters without modules_to_save, or merge them with surgeon merge.")


def carried_embeddings(adapters: Sequence[tuple[Adapter, float]]) -> list[tuple[int, str]]:
    """Saved copies of targeted embedding layers (peft's save_embedding_layers): carried over from the first
    adapter holding each, byte for byte, as peft's saved combination would hold them; they must agree."""
    chosen: dict[str, tuple[int, str]] = {}
    for idx, (adapter, _) in enumerate(adapters):
        for full in adapter_layout(adapter.weights).full:
            if full.source not in chosen:
                chosen[full.source] = (idx, full.source)
                continue
            first = adapters[chosen[full.source][0]][0]
            if first.weights.read_raw(full.source) != adapter.weights.read_raw(full.source):
                raise OptionError(
                    f"{full.source}: the saved embedding layer differs between {first.folder} and {adapter.folder}; "
                    "the adapters were saved from different (or resized) base models. Combine adapters of one base.")
    return [chosen[k] for k in sorted(chosen)]


def module_scaling(adapter: Adapter, path: str, rank: int) -> float:
    raw = adapter.config.raw
    alpha = float(pattern_value(raw.get("alpha_pattern"), path, raw.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if raw.get("use_rslora") else alpha / rank


def _target_modules(adapters: Sequence[Adapter]) -> list[str] | str:
    targets = [a.config.raw.get("target_modules") for a in adapters]
    kinds = {isinstance(t, str) for t in targets}
    if len(kinds) > 1:
        raise OptionError("the adapters give target_modules as a mix of lists and regex strings; peft cannot "
                          "combine those. Re-save them with the same kind of target_modules.")
    if isinstance(targets[0], str):
        return "|".join(f"({t})" for t in targets)
    return sorted(set().union(*(set(t or []) for t in targets)))


def _rank_error(method: str, ranks: list[int], where: str) -> OptionError:
    return OptionError(
        f"--method {method} needs adapters of equal rank, got ranks {', '.join(map(str, ranks))}{where}; use "
        f"--method cat (ranks add up) or --method {method + '_svd' if method != 'linear' else 'svd'} "
        "(factored again to --svd-rank), which take any ranks.")


def check_options(options: CombineOptions, count: int) -> None:
    if options.method not in COMBINATIONS:
        raise OptionError(f"--method {options.method!r} is not one of peft's combinations: {', '.join(COMBINATIONS)}.")
    if options.method in NEEDS_DENSITY and count > 1:
        if options.density is None:
            raise OptionError(f"--method {options.method} needs --density (the fraction kept, in (0, 1]).")
    if options.density is not None and not (0 < options.density <= 1):
        raise OptionError(f"--density {options.density:g} is outside (0, 1]; it is the fraction of each adapter "
                          "kept, e.g. --density 0.5.")
    if options.svd_clamp is not None and not (0 <= options.svd_clamp <= 1):
        raise OptionError(f"--svd-clamp {options.svd_clamp:g} is a quantile and must be in [0, 1], e.g. 0.99.")
    rank = options.svd_rank
    if rank is not None and (rank <= 0 or (isinstance(rank, float) and rank > 1)):
        raise OptionError(f"--svd-rank {rank}: give a rank ≥ 1 (e.g. 16) or an energy fraction in (0, 1] (e.g. 0.9).")
    if isinstance(rank, float) and count > 1:
        raise OptionError("--svd-rank as an energy fraction only works when converting one adapter; give an int rank.")
    if options.majority_sign not in ("total", "frequency"):
        raise OptionError(f"--majority-sign {options.majority_sign!r}: use total or frequency.")


def plan_combine(adapters: Sequence[tuple[Adapter, float]], options: CombineOptions) -> CombinePlan:
    """Every output module, its rank and the inputs acting on it, and the result's adapter config."""
    for adapter, _ in adapters:
        check_combinable(adapter)
    method = "linear" if len(adapters) == 1 else options.method
    ranks = [_config_rank(a) for a, _ in adapters]
    if method in EQUAL_RANK and len(set(ranks)) != 1:
        raise _rank_error(method, ranks, "")
    new_rank = {"cat": sum(ranks)}.get(method, ranks[0]) if not method.endswith("svd") else \
        int(options.svd_rank or max(ranks))
    modules: dict[str, list[Member]] = {}
    embedding: dict[str, bool] = {}
    for idx, (adapter, weight) in enumerate(adapters):
        for path, module in adapter_layout(adapter.weights).modules.items():
            emb = "lora_embedding_A" in module.tensors
            roles = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
            if not all(r in module.tensors for r in roles):
                raise UnsupportedAdapterError(f"{adapter.folder}: module {path!r} lacks {roles[0]} or {roles[1]}; "
                                              "re-save the adapter.")
            a_name, b_name = module.tensors[roles[0]], module.tensors[roles[1]]
            rank = adapter.weights.info(a_name).shape[0]
            modules.setdefault(path, []).append(
                Member(idx, float(weight), a_name, b_name, rank, module_scaling(adapter, path, rank)))
            embedding[path] = emb
    jobs = [_job(path, embedding[path], members, adapters, method, new_rank) for path, members in sorted(modules.items())]
    config = dict(adapters[0][0].config.raw)
    config.update(r=new_rank, lora_alpha=new_rank, target_modules=_target_modules([a for a, _ in adapters]),
                  alpha_pattern={}, rank_pattern={})
    odd = {j.path: j.rank for j in jobs if j.rank != new_rank}  # a module of another rank (rank_pattern inputs)
    if odd:
        config.update(rank_pattern=odd, alpha_pattern={p: r for p, r in odd.items()})
    return CombinePlan(method, new_rank, config, jobs, carried_embeddings(adapters))


def _job(path: str, emb: bool, members: list[Member], adapters: Sequence[tuple[Adapter, float]], method: str,
         new_rank: int) -> ModuleJob:
    first = adapters[members[0].adapter][0].weights
    a_shape, b_shape = first.info(members[0].lora_A).shape, first.info(members[0].lora_B).shape
    features = (int(b_shape[0]), int(a_shape[1]))
    for m in members[1:]:
        w = adapters[m.adapter][0].weights
        got = (int(w.info(m.lora_B).shape[0]), int(w.info(m.lora_A).shape[1]))
        if got != features:
            raise OptionError(
                f"module {path!r} is {list(features)} in {adapters[members[0].adapter][0].folder} but {list(got)} "
                f"in {adapters[m.adapter][0].folder}; the adapters were trained on different base models.")
    if method in EQUAL_RANK:
        module_ranks = sorted({m.rank for m in members})
        if len(module_ranks) > 1:
            raise _rank_error(method, module_ranks, f" for module {path!r}")
        rank = module_ranks[0]
    else:
        rank = new_rank
    return ModuleJob(path, emb, rank, features, tuple(members))
