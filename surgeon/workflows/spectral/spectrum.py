"""`surgeon spectrum`: layer-by-layer singular values of a checkpoint's weight matrices, streamed.

Per selected 2-D weight (nn.Linear orientation; GPT-2 Conv1D transposed): the top-k
singular values (block Krylov, checked against residuals) or, with ``full``, all of them
(float64 Gram eigenvalues), the spectral norm σ₁, the Frobenius norm, the stable rank
‖W‖_F²/σ₁² and, with ``full``, the effective rank exp(−Σ p_i ln p_i), p_i = σ_i/Σσ
(Roy & Vetterli 2007). The next tensor is read while the current one is decomposed.

Also home of what the spectral workflows share: target selection and read-ahead.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from surgeon.errors import OptionError, OutputError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.resolve import resolve_path
from surgeon.io.roles import refuse_adapter
from surgeon.io.svd_cache import SvdCache, content_key
from surgeon.io.output import check_side_output, refuse_non_finite, write_side_output
from surgeon.io.writer import CheckpointWriter, TensorSpec
from surgeon.ops import svd
from surgeon.ops.targets import DEFAULT_PRESET, Target, TargetSpecError, select_targets
from surgeon.parallel.exchange import collect, device_for, plan_share, run_share, sum_counts
from surgeon.parallel.share import svd_cost
from surgeon.parallel.world import SOLO, World
from surgeon.progress import progress
from surgeon.provenance import provenance, safetensors_metadata
from surgeon.workflows.convert import FLOAT_DTYPES
from surgeon.workflows.merge.run import pick_device

T = TypeVar("T")
R = TypeVar("R")


# -- shared by the spectral workflows ---------------------------------------------------------
def resolve_targets(ckpt: Checkpoint, spec: str, *, what: str) -> list[Target]:
    """The matrices of ``ckpt`` that ``spec`` (preset or regex) selects; an error when none."""
    model_type = (ckpt.config() or {}).get("model_type")
    shapes = {name: info.shape for name, info in ckpt.tensors.items()}
    floating = {name: info.dtype in FLOAT_DTYPES for name, info in ckpt.tensors.items()}
    try:
        targets = select_targets(shapes, spec, model_type=model_type, floating=floating)
    except TargetSpecError as exc:
        raise OptionError(f"{exc}; e.g. --targets 'layers\\.\\d+\\..*_proj\\.weight'.") from None
    if not targets:
        two_d = [n for n, s in shapes.items() if len(s) == 2][:3]
        raise OptionError(
            f"{what}: --targets {spec!r} selects no 2-D floating-point weight (its 2-D tensors are named like "
            f"{', '.join(two_d) or 'nothing'}); give a preset that fits this architecture or a regex, "
            "e.g. --targets 'attention.*weight'."
        )
    return targets


class ReadAhead(Generic[T, R]):
    """(item, load(item)) in order, loading up to ``depth`` items ahead on a thread.

    Reading and hashing release the GIL, so the next tensors come off the disk while the current one is
    decomposed. ``deferred``: the next load starts only when the consumer calls :meth:`prefetch` (or asks
    for the next item), so that it can keep the reader off the cores while it runs a phase that wants
    them all (the base's two-thread Gram eigendecomposition) and let it run beside a one-thread phase.
    """

    def __init__(self, items: Iterable[T], load: Callable[[T], R], *, depth: int = 1, deferred: bool = False) -> None:
        self._items = list(items)
        self._load = load
        self._depth = depth
        self._deferred = deferred
        self._pending: list[tuple[T, Future[R]]] = []
        self._next = 0
        self._pool: ThreadPoolExecutor | None = None

    def prefetch(self) -> None:
        """Start loading the next items (up to ``depth`` ahead), if not started yet."""
        while self._pool is not None and len(self._pending) < self._depth and self._next < len(self._items):
            item = self._items[self._next]
            self._pending.append((item, self._pool.submit(self._load, item)))
            self._next += 1

    def __iter__(self) -> Iterator[tuple[T, R]]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="surgeon-read") as pool:
            self._pool = pool
            try:
                self.prefetch()
                while self._pending:
                    item, future = self._pending.pop(0)
                    if not self._deferred:
                        self.prefetch()
                    result = future.result()
                    yield item, result
                    self.prefetch()  # a consumer that did not ask: the next one now
            finally:
                self._pool = None


def read_ahead(items: Iterable[T], load: Callable[[T], R], *, depth: int = 1) -> Iterator[tuple[T, R]]:
    """Yield (item, load(item)) in order, loading up to ``depth`` items ahead on a thread (:class:`ReadAhead`)."""
    return iter(ReadAhead(items, load, depth=depth))


def linear_float64(raw: bytes | bytearray, ckpt: Checkpoint, target: Target) -> torch.Tensor:
    """The stored bytes of ``target`` as a float64 matrix in nn.Linear orientation (out × in)."""
    info = ckpt.info(target.name)
    w = torch.frombuffer(raw, dtype=info.torch_dtype).reshape(info.shape) if info.nbytes else torch.empty(info.shape)
    w = w.to(torch.float64)
    refuse_non_finite(w, where=info.file, name=target.name, role="holds",
                      fix="its singular vectors are undefined; re-download or re-create this checkpoint")
    return w.T.contiguous() if target.transposed else w


def open_cache(cache: str | os.PathLike[str] | None, *, enabled: bool) -> SvdCache:
    from surgeon.io.svd_cache import default_cache_dir

    if not enabled:
        return SvdCache(None)
    return SvdCache(cache if cache is not None else default_cache_dir())


# -- spectrum -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MatrixSpectrum:
    """Spectral summary of one matrix (shape in nn.Linear orientation)."""

    name: str
    layer: int | None
    module: str
    shape: list[int]
    transposed: bool
    spectral_norm: float
    frobenius_norm: float
    stable_rank: float
    effective_rank: float | None
    singular_values: list[float]
    method: str
    seconds: float


@dataclass(frozen=True)
class SpectrumReport:
    model: str
    targets: str
    top_k: int | None
    full: bool
    device: str
    matrices: list[MatrixSpectrum]
    cache: dict[str, int]
    output: str | None
    seconds: float
    world_size: int = 1
    computed_by_rank: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        owners = body.pop("computed_by_rank")
        for m, rank in zip(body["matrices"], owners):
            m["computed_by_rank"] = rank
        return body


def effective_rank(s: torch.Tensor) -> float:
    """exp(entropy of σ/Σσ) (Roy & Vetterli); 0 for a zero matrix."""
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def _summary(target: Target, w: torch.Tensor, s: torch.Tensor, *, full: bool, method: str,
             seconds: float) -> MatrixSpectrum:
    fro = float(w.norm())
    sigma1 = float(s[0]) if s.numel() else 0.0
    return MatrixSpectrum(
        name=target.name, layer=target.layer, module=target.module, shape=list(target.linear_shape),
        transposed=target.transposed, spectral_norm=sigma1, frobenius_norm=fro,
        stable_rank=fro * fro / (sigma1 * sigma1) if sigma1 > 0 else 0.0,
        effective_rank=effective_rank(s) if full else None,
        singular_values=[float(x) for x in s], method=method, seconds=seconds,
    )


def _spectrum_one(ckpt: Checkpoint, target: Target, raw: bytearray, *, top_k: int, full: bool, device: torch.device,
                  cache: SvdCache, counts: dict[str, int], method: str) -> MatrixSpectrum:
    start = time.perf_counter()
    w = linear_float64(raw, ckpt, target).to(device)
    info = ckpt.info(target.name)
    if full and cache.enabled:
        key = content_key(raw, info.dtype, info.shape, transposed=target.transposed)
        entry = cache.load(key, size=min(w.shape))
        if entry is None:
            base = svd.base_basis(w)
            cache.store(key, base.side, base.basis, base.s)
            s, how = base.s, "dense"
            counts["misses"] += 1
        else:
            s, how = entry.s.to(device), "cache"
            counts["hits"] += 1
    elif full:
        s, how = svd.singular_values(w), "dense"
    else:
        result = svd.top_k(w, top_k, method=method)
        s, how = result.s, result.method
    return _summary(target, w, s, full=full, method=how, seconds=time.perf_counter() - start)


def spectrum(
    model: str | os.PathLike[str],
    *,
    targets: str = DEFAULT_PRESET,
    top_k: int = 10,
    full: bool = False,
    device: str = "auto",
    cache: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    method: str = "auto",
    world: World = SOLO,
) -> SpectrumReport:
    """Singular values of every selected matrix of ``model``, one tensor in memory at a time.

    ``full``: every singular value and the effective rank; with ``cache`` (a folder) the
    complete base decomposition is computed once and kept there (so that a later
    ``intruders`` against this model starts warm), or read from it. ``output``: a
    ``.json`` file (this report, every value) or a ``.safetensors`` file (one float64
    vector of singular values per matrix).
    """
    if top_k < 1:
        raise OptionError(f"--top-k {top_k}: give a positive number of singular values (or --full for all).")
    begin = time.perf_counter()
    dev = pick_device(device_for(world, device))
    store = SvdCache(cache) if (full and cache is not None) else SvdCache(None)
    counts = {"hits": 0, "misses": 0}
    model_path = resolve_path(model)
    refuse_adapter(model_path, expected="a model", fix="spectrum decomposes a model's matrices: merge the adapter "
                   "first with `surgeon merge`, or compare it with its base by `surgeon intruders ADAPTER --base BASE`")
    _check_output(output, overwrite, model_path)  # before the work: never into the input, never over a file
    with Checkpoint.open(model_path) as ckpt:
        chosen = resolve_targets(ckpt, targets, what=str(model))
        part = plan_share(world, [svd_cost(*t.linear_shape) for t in chosen])
        mine = [chosen[i] for i in part.mine]
        stream = progress(read_ahead(mine, lambda t: ckpt.read_raw(t.name)), total=len(mine), desc="spectrum")
        run_share(part, [t.name for t in mine],
                  (_spectrum_one(ckpt, target, raw, top_k=top_k, full=full, device=dev, cache=store, counts=counts,
                                 method=method) for target, raw in stream))
    rows = collect(part, encode=asdict, decode=lambda d: MatrixSpectrum(**d))
    counts = sum_counts(world, counts)
    report = SpectrumReport(str(model), targets, None if full else top_k, full, str(dev), rows, counts,
                            str(output) if output is not None else None, time.perf_counter() - begin,
                            world.size, part.owners)
    if output is not None and world.is_main:
        _write_output(Path(output), report, source=model_path, overwrite=overwrite)
    return report


def _check_output(output: str | os.PathLike[str] | None, overwrite: bool, source: Path) -> None:
    if output is None:
        return
    path = Path(output)
    if path.suffix not in (".json", ".safetensors"):
        raise OutputError(f"{path}: -o takes a .json file (the report) or a .safetensors file (singular values); "
                          "give a name ending in one of those.")
    check_side_output(path, overwrite=overwrite, inputs=[source], what="output")


def _write_output(path: Path, report: SpectrumReport, *, source: Path, overwrite: bool) -> None:
    record = provenance("spectrum", {"targets": report.targets, "top_k": report.top_k, "full": report.full},
                        inputs={"model": report.model})
    if path.suffix == ".json":
        write_side_output(path, json.dumps({"provenance": record, **report.to_dict()}, indent=1) + "\n",
                          overwrite=overwrite, inputs=[source], what="output")
        return
    specs = [TensorSpec(m.name, "F64", (len(m.singular_values),)) for m in report.matrices]
    with CheckpointWriter(path, specs, metadata=safetensors_metadata(record), overwrite=overwrite,
                          inputs=[source]) as writer:
        for m in report.matrices:
            writer.write(m.name, torch.tensor(m.singular_values, dtype=torch.float64))
