"""`surgeon intruders`: intruder dimensions of a fine-tune against its base, streamed.

Definition (DESIGN.md, the authors' code): for the top-k left singular vectors u_j of the
tuned W_t (nn.Linear orientation, Conv1D transposed), c_j = max_i |u_jᵀu₀,i| over all
min(m, n) left singular vectors of the base W₀; u_j is an intruder when c_j < ε.

What is computed, per matrix: the base's complete singular basis once (float64 Gram
eigendecomposition, cached on disk by content hash), and only the top-k triplets of W_t
(block Krylov, residual-checked, dense fallback). When W_t is BASE + a LoRA, the
iteration runs in the base's basis where each step costs O(N·r). Matrices the fine-tune
left bit-identical are reported as unchanged without a decomposition. The next tensors
are read and hashed on a thread while the current one is decomposed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgeon.errors import AdapterError, CheckpointFormatError, OptionError, ShapeMismatchError
from surgeon.io.adapter import Adapter, BaseNames, is_adapter_folder
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.output import refuse_non_finite
from surgeon.io.resolve import resolve_path
from surgeon.io.svd_cache import CachedBasis, SvdCache, content_key
from surgeon.ops import intruders as ops
from surgeon.ops import svd
from surgeon.ops.finite import non_finite_count
from surgeon.ops.targets import DEFAULT_PRESET, Target
from surgeon.ops.threads import one_cpu_thread
from surgeon.parallel.exchange import collect, device_for, plan_share, run_share, sum_counts
from surgeon.parallel.share import svd_cost
from surgeon.parallel.world import SOLO, World
from surgeon.progress import progress
from surgeon.workflows.device import keep_freed_memory
from surgeon.workflows.merge.run import MergePlan, merged_float32, pick_device, plan_adapter_merge
from surgeon.workflows.spectral.results import (Decomposition, IntruderOptions, IntrudersReport, MatrixIntruders,
                                                SideCosines, build_row, row_from_wire, row_to_wire)
from surgeon.workflows.spectral.spectrum import ReadAhead, linear_float64, open_cache, resolve_targets

# -- inputs -----------------------------------------------------------------------------------
@dataclass
class Inputs:
    """The opened base, the tuned checkpoint (None: the base itself) and the adapter plan, if any."""

    base: Checkpoint
    tuned: Checkpoint | None
    adapter: Adapter | None
    plan: MergePlan | None
    base_path: Path
    tuned_path: Path | None
    adapter_path: Path | None
    _names: BaseNames | None = None

    @property
    def host(self) -> Checkpoint:
        """The checkpoint the adapter applies to."""
        return self.tuned if self.tuned is not None else self.base

    def tuned_name(self, name: str) -> str | None:
        """TUNED's name for base tensor ``name``: the same, or the one that differs by leading components
        (``bert.encoder...`` against ``encoder...``, as when a task model is compared with its encoder)."""
        assert self.tuned is not None
        if name in self.tuned:
            return name
        if self._names is None:
            self._names = BaseNames(self.tuned.keys())
        return self._names.resolve(name, what=str(self.tuned_path))


@contextmanager
def open_inputs(tuned: str | os.PathLike[str] | None, base: str | os.PathLike[str],
                adapter: str | os.PathLike[str] | None) -> Iterator[Inputs]:
    """Open BASE, TUNED and ADAPTER. A TUNED that is an adapter folder means BASE + that adapter."""
    tuned_path = resolve_path(tuned) if tuned is not None else None
    adapter_path = resolve_path(adapter) if adapter is not None else None
    if tuned_path is not None and tuned_path.is_dir() and is_adapter_folder(tuned_path):
        if adapter_path is not None:
            raise AdapterError(f"{tuned_path}: TUNED is an adapter folder and --adapter is given too; give the "
                               "adapter once (as TUNED or as --adapter).")
        tuned_path, adapter_path = None, tuned_path
    if tuned_path is None and adapter_path is None:
        raise OptionError("no fine-tune given: pass TUNED (a checkpoint or an adapter folder) or --adapter ADAPTER.")
    base_path = resolve_path(base)
    with ExitStack() as stack:
        base_ckpt = stack.enter_context(Checkpoint.open(base_path))
        tuned_ckpt = stack.enter_context(Checkpoint.open(tuned_path)) if tuned_path is not None else None
        adapter_obj = stack.enter_context(Adapter.open(adapter_path)) if adapter_path is not None else None
        plan = None
        if adapter_obj is not None:
            plan = plan_adapter_merge(tuned_ckpt if tuned_ckpt is not None else base_ckpt, [(adapter_obj, 1.0)])
        yield Inputs(base_ckpt, tuned_ckpt, adapter_obj, plan, base_path, tuned_path, adapter_path)


# -- reading (on the read-ahead thread) ------------------------------------------------------------
@dataclass
class Loaded:
    """One target. The reader thread fills the stored bytes, the cache entry and the LoRA factors
    (I/O and hashing, which release the GIL) and converts bf16/fp16/fp32 bytes to float64 with
    numpy (single-threaded, GIL released: no second team of compute threads competing with the
    decomposition); :func:`materialize` does the rest on the main thread. W_t is ``tuned``
    (dense, float64, nn.Linear orientation) or W₀ + left·right (``factors``)."""

    target: Target
    raw0: bytearray
    key: str
    cached: CachedBasis | None
    factors: tuple[torch.Tensor, torch.Tensor] | None
    tuned_raw: tuple[str, bytearray] | None = None
    merge: bool = False
    unchanged: bool = False
    w0: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    tuned: torch.Tensor | None = None
    finite: bool = False  # both matrices converted and checked finite on the reader thread
    tau: torch.Tensor | None = None  # W_t − W₀ in float32, from the reader thread


def _lora_factors(inputs: Inputs, target: Target) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(left (m × r), right (r × n)) with W_t = W₀ + left·right, when only plain LoRA acts on the base."""
    ops_ = inputs.plan.targets.get(target.name, ()) if inputs.plan is not None else ()
    if inputs.tuned is not None or not ops_ or any(op.kind != "lora" or op.fan_in_fan_out != target.transposed
                                                   for op in ops_):
        return None
    weights = inputs.plan.adapters  # type: ignore[union-attr]
    get = lambda op, role: weights[op.adapter].weights.get(op.tensors[role], dtype=torch.float64)  # noqa: E731
    left = torch.cat([get(op, "lora_B") * op.scaling for op in ops_], 1)
    right = torch.cat([get(op, "lora_A") for op in ops_], 0)
    return left, right


def _tuned_bytes(inputs: Inputs, target: Target, raw0: bytearray) -> tuple[str, bytearray] | None:
    """TUNED's name and stored bytes for ``target``, or None when they equal the base's."""
    assert inputs.tuned is not None
    name = inputs.tuned_name(target.name)
    if name is None:
        raise CheckpointFormatError(
            f"{inputs.tuned_path}: has no tensor {target.name!r}, which the base has; TUNED must be a fine-tune of "
            "BASE with the same tensor names. Check the two paths (or narrow --targets)."
        )
    info = inputs.tuned.info(name)
    if info.shape != inputs.base.info(target.name).shape:
        raise ShapeMismatchError(
            f"{inputs.tuned_path}: tensor {name!r} is {list(info.shape)} but {list(target.shape)} in the base; "
            "TUNED is not a fine-tune of BASE. Check the two paths."
        )
    raw = inputs.tuned.read_raw(name)
    return None if info.dtype == inputs.base.info(target.name).dtype and raw == raw0 else (name, raw)


def read_target(inputs: Inputs, target: Target, cache: SvdCache) -> Loaded:
    """Everything ``target`` needs from disk (on the read-ahead thread)."""
    raw0 = inputs.base.read_raw(target.name)
    info = inputs.base.info(target.name)
    key = content_key(raw0, info.dtype, info.shape, transposed=target.transposed)
    loaded = Loaded(target, raw0, key, cache.load(key, size=min(target.shape)), _lora_factors(inputs, target))
    if loaded.factors is not None:
        loaded.w0 = _float64(raw0, info.dtype, info.shape, target.transposed)
        return loaded
    if inputs.plan is not None and target.name in inputs.plan.targets:
        loaded.merge = True
    elif inputs.tuned is not None:
        loaded.tuned_raw = _tuned_bytes(inputs, target, raw0)
    loaded.unchanged = not loaded.merge and loaded.tuned_raw is None
    if not loaded.unchanged:
        if loaded.tuned_raw is None:
            loaded.w0 = _float64(raw0, info.dtype, info.shape, target.transposed)
            return loaded
        name, raw = loaded.tuned_raw
        tinfo = inputs.tuned.info(name)  # type: ignore[union-attr]
        w0, tuned = _widened(raw0, info.dtype), _widened(raw, tinfo.dtype)
        loaded.w0 = _float64(raw0, info.dtype, info.shape, target.transposed, widened=w0)
        loaded.tuned = _float64(raw, tinfo.dtype, tinfo.shape, target.transposed, widened=tuned)
        if w0 is not None and tuned is not None and w0.dtype == tuned.dtype == np.float32 and loaded.tuned.numel():
            # τ in float32 for the merged route's range finder, off the main thread: the difference of the two
            # float32 matrices (exact widenings of bf16/fp16), rounded once. τ finite means both matrices are
            # (inf − inf and NaN are not); a τ that overflowed is left to the main thread's checks
            tau = np.subtract(tuned, w0).reshape(tuple(info.shape))
            loaded.tau = torch.from_numpy(np.ascontiguousarray(tau.T) if target.transposed else tau)
            loaded.finite = bool(np.isfinite(tau).all())
        else:
            loaded.finite = _all_finite(loaded.w0) and _all_finite(loaded.tuned)
            if loaded.finite:
                loaded.tau = torch.from_numpy(np.subtract(loaded.tuned.numpy(), loaded.w0.numpy(), dtype=np.float32))
        if not loaded.finite:
            loaded.tau = None
    return loaded


def _all_finite(matrix: torch.Tensor) -> bool:
    """No NaN/Inf in a converted matrix (numpy, GIL released); False when it is left to the main thread."""
    return matrix.numel() > 0 and non_finite_count(matrix) == 0


_NUMPY_FLOATS = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def _widened(raw: bytearray, dtype: str) -> np.ndarray | None:
    """Stored bytes as a flat float32 (BF16, F16: exact) or their own float32/float64 numpy array; None for
    other dtypes (left to the main thread)."""
    if dtype == "BF16":
        return np.left_shift(np.frombuffer(raw, dtype=np.uint16), 16, dtype=np.uint32).view(np.float32)
    if dtype == "F16":
        return np.frombuffer(raw, dtype=np.float16).astype(np.float32)
    if dtype in _NUMPY_FLOATS:
        return np.frombuffer(raw, dtype=_NUMPY_FLOATS[dtype])
    return None


def _float64(raw: bytearray, dtype: str, shape: Sequence[int], transposed: bool, *,
             widened: np.ndarray | None = None) -> torch.Tensor:
    """Stored bytes as a float64 matrix in nn.Linear orientation, by numpy (empty: leave it to the main thread).
    ``widened``: :func:`_widened` of the same bytes, if already made."""
    flat = widened if widened is not None else _widened(raw, dtype)
    if flat is None:
        return torch.empty(0)
    array = flat.astype(np.float64).reshape(tuple(shape))
    return torch.from_numpy(np.ascontiguousarray(array.T) if transposed else array)


def materialize(inputs: Inputs, loaded: Loaded) -> Loaded:
    """W₀ and a dense W_t as float64 matrices in nn.Linear orientation (on the main thread)."""
    target = loaded.target
    if loaded.w0.numel() == 0 and min(target.shape) > 0:
        loaded.w0 = linear_float64(loaded.raw0, inputs.base, target)
    if loaded.merge:
        w = merged_float32(inputs.host, inputs.plan, target.name).to(torch.float64)  # type: ignore[arg-type]
        loaded.tuned = w.T.contiguous() if target.transposed else w
    elif loaded.tuned_raw is not None:
        name, raw = loaded.tuned_raw
        w = loaded.tuned
        if w is None or w.numel() == 0:
            w = linear_float64(raw, inputs.tuned, replace(target, name=name))  # type: ignore[arg-type]
        loaded.tuned, loaded.unchanged = (None, True) if torch.equal(w, loaded.w0) else (w, False)
    undefined = "its singular vectors are undefined; re-download or re-create this checkpoint"
    if loaded.finite and loaded.tuned is not None:  # checked on the reader thread
        loaded.raw0, loaded.tuned_raw = bytearray(), None
        return loaded
    refuse_non_finite(loaded.w0, where=inputs.base.info(target.name).file, name=target.name, role="holds", fix=undefined)
    if loaded.tuned is not None:
        refuse_non_finite(loaded.tuned, where=str(inputs.tuned_path or inputs.adapter_path), name=target.name,
                          role="holds", fix=undefined)
    loaded.raw0, loaded.tuned_raw = bytearray(), None
    return loaded


# -- analysis ----------------------------------------------------------------------------------
@dataclass
class Analysis:
    """A target's result with what scale-intruders needs: the triplets and W_t's source."""

    row: MatrixIntruders
    loaded: Loaded
    triplets: svd.Triplets | None


def _base(loaded: Loaded, cache: SvdCache, device: torch.device, counts: dict[str, int]) -> tuple[svd.BaseBasis, str]:
    entry = loaded.cached
    if entry is not None:
        counts["hits"] += 1
        return svd.BaseBasis(entry.side, entry.basis.to(device), entry.s.to(device)), "hit"
    base = svd.base_basis(loaded.w0.to(device))
    cache.store(loaded.key, base.side, base.basis, base.s)
    counts["misses" if cache.enabled else "computed"] += 1
    return base, "miss" if cache.enabled else "off"


def _triplets(loaded: Loaded, base: svd.BaseBasis, options: IntruderOptions, device: torch.device) -> svd.Triplets:
    w0 = loaded.w0.to(device)
    if loaded.factors is not None:
        left, right = (f.to(device) for f in loaded.factors)
        return svd.top_k_low_rank(w0, base, left, right, options.top_k, tol=options.tol, method=options.method)
    assert loaded.tuned is not None
    tau = loaded.tau.to(device) if loaded.tau is not None else None
    return svd.top_k_merged(w0, base, loaded.tuned.to(device), options.top_k, tol=options.tol, method=options.method,
                            tau=tau)


def _side(base: svd.BaseBasis, w0: torch.Tensor, vectors: torch.Tensor, side: str, dim: int
          ) -> tuple[SideCosines, torch.Tensor]:
    """c_j of ``vectors`` on one side against the base, and the cosine matrix (N × k) it came from."""
    cosines = ops.base_cosines(base, w0, vectors, side)
    best, where = ops.max_cosines(cosines)
    match = [i + 1 for i in where] if side == "left" else None
    return SideCosines(best, match, ops.random_baseline(dim, base.size)), cosines


def _row(loaded: Loaded, base: svd.BaseBasis, trip: svd.Triplets, options: IntruderOptions,
         how: Decomposition) -> MatrixIntruders:
    target, w0 = loaded.target, loaded.w0.to(trip.u.device)
    m, n = target.linear_shape
    left = right = similarity = None
    if options.side != "right":
        left, cos_l = _side(base, w0, trip.u, "left", m)
        similarity = cos_l[: options.plot_base].T.float().cpu().numpy()
    if options.side != "left":
        right, _ = _side(base, w0, trip.v, "right", n)
    return build_row(target, how, sigma=trip.s.tolist(), epsilon=options.epsilon, left=left, right=right,
                     similarity=similarity)


def analyse_stream(inputs: Inputs, targets: Sequence[Target], options: IntruderOptions, cache: SvdCache,
                   device: torch.device, counts: dict[str, int], *, desc: str = "intruders") -> Iterator[Analysis]:
    """Analyse ``targets`` in order, reading ahead; yields one :class:`Analysis` per target."""
    if device.type == "cpu":
        keep_freed_memory()  # big matrices come and go: reuse the memory rather than fault in fresh pages
    stream = ReadAhead(targets, lambda t: read_target(inputs, t, cache), deferred=device.type == "cpu")
    for target, loaded in progress(stream, total=len(targets), desc=desc):
        begin = time.perf_counter()
        loaded = materialize(inputs, loaded)
        if loaded.unchanged:
            stream.prefetch()
            yield Analysis(build_row(target, Decomposition.unchanged(time.perf_counter() - begin)), loaded, None)
            continue
        # the base's complete basis (one Gram eigendecomposition, compute-bound: 1.7x faster on 2 threads than
        # on 1 for 2048 x 2048) on every thread, with the reader idle (reading beside it slowed the Gram by 0.3 s
        # of a 2048 x 5632 matrix's 0.44); then the next matrix is read while this one iterates on one thread
        # (2.5-4x less CPU on 2 cores than two threads beside the reader)
        base, state = _base(loaded, cache, device, counts)
        stream.prefetch()
        with one_cpu_thread(device):
            trip = _triplets(loaded, base, options, device)
            loaded.tau = None
            how = Decomposition(trip.method, trip.steps, trip.residual, state, time.perf_counter() - begin)
            row = _row(loaded, base, trip, options, how)
        yield Analysis(row, loaded, trip)


def planned_cost(inputs: Inputs, target: Target, options: IntruderOptions, *, cached: bool = False) -> float:
    """Estimated floating-point work of ``target`` before anything is read (for sharing matrices between
    workers): the route TUNED implies (BASE + a plain LoRA: the low-rank route at the adapter's rank; a dense
    TUNED: the merged route), ``cached``: the base's basis is known to be on disk. See :func:`svd.estimate_cost`."""
    ops_ = inputs.plan.targets.get(target.name, ()) if inputs.plan is not None else ()
    if inputs.tuned is None and ops_ and all(op.kind == "lora" for op in ops_):
        rank = sum(int(inputs.plan.adapters[op.adapter].weights.info(op.tensors["lora_A"]).shape[0])  # type: ignore
                   for op in ops_)
        return svd.estimate_cost(target.linear_shape, options.top_k, route="lowrank", cached=cached, rank=rank)
    route = "merged" if options.method == "auto" else ("dense" if options.method == "dense" else "krylov")
    return svd.estimate_cost(target.linear_shape, options.top_k, route=route, cached=cached)


def totals(rows: Sequence[MatrixIntruders]) -> dict[str, Any]:
    """Intruder counts in all, per layer and per module type, and the ε sweep summed."""
    per_layer: dict[str, int] = {}
    per_module: dict[str, int] = {}
    swept: dict[str, int] = {f"{e:g}": 0 for e in ops.EPSILON_SWEEP}
    for row in (r for r in rows if r.status == "analysed"):
        layer = "-" if row.layer is None else str(row.layer)
        per_layer[layer] = per_layer.get(layer, 0) + len(row.intruders)
        per_module[row.module] = per_module.get(row.module, 0) + len(row.intruders)
        for eps, count in row.sweep.items():
            swept[eps] = swept.get(eps, 0) + count
    return {
        "intruders": sum(len(r.intruders) for r in rows), "matrices": len(rows),
        "analysed": sum(1 for r in rows if r.status == "analysed"),
        "unchanged": sum(1 for r in rows if r.status == "unchanged"),
        "with_intruders": sum(1 for r in rows if r.intruders),
        "per_layer": per_layer, "per_module": per_module, "sweep": swept,
    }


def find_intruders(
    tuned: str | os.PathLike[str] | None,
    base: str | os.PathLike[str],
    *,
    adapter: str | os.PathLike[str] | None = None,
    targets: str = DEFAULT_PRESET,
    options: IntruderOptions = IntruderOptions(),
    device: str = "auto",
    cache: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    plot: str | os.PathLike[str] | None = None,
    plot_matrices: str | None = None,
    world: World = SOLO,
) -> IntrudersReport:
    """Intruder dimensions of TUNED (or BASE + ``adapter``) against BASE, per selected matrix.

    On a process group (``world``), each rank analyses its share of the matrices (by SVD cost);
    every rank gets the whole report, and only rank 0 draws the plots.
    """
    options.check()
    begin = time.perf_counter()
    dev = pick_device(device_for(world, device))
    store = open_cache(cache, enabled=use_cache)
    counts = {"hits": 0, "misses": 0, "computed": 0}
    with open_inputs(tuned, base, adapter) as inputs:
        chosen = resolve_targets(inputs.base, targets, what=str(base))
        part = plan_share(world, [svd_cost(*t.linear_shape) for t in chosen])
        analysed = analyse_stream(inputs, [chosen[i] for i in part.mine], options, store, dev, counts)
        run_share(part, [chosen[i].name for i in part.mine], (a.row for a in analysed))
        tuned_arg, adapter_arg = inputs.tuned_path, inputs.adapter_path
    rows = collect(part, encode=row_to_wire, decode=row_from_wire)
    counts = sum_counts(world, counts)
    methods: dict[str, int] = {}
    for row in rows:
        methods[row.method] = methods.get(row.method, 0) + 1
    plots: list[str] = []
    if plot is not None and world.is_main:
        from surgeon.workflows.spectral.plots import write_plots

        plots = write_plots(Path(plot), rows, epsilon=options.epsilon, select=plot_matrices)
    cache_info = {"dir": str(store.root) if store.root else None, **counts}
    return IntrudersReport(
        str(tuned_arg) if tuned_arg is not None else None, str(base),
        str(adapter_arg) if adapter_arg is not None else None, targets,
        options.epsilon, options.top_k, options.side, str(dev), rows, totals(rows), cache_info, methods, plots,
        time.perf_counter() - begin, world.size, part.owners,
    )
