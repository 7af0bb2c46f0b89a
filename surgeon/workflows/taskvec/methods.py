"""mergekit's merge methods over task vectors and fine-tunes, one tensor at a time, in blocks of rows.

Every output tensor is computed in two sweeps over its inputs: the first decides, per input,
whether its τ is non-zero and what its sparsification keeps (for the magnitude methods exactly
mergekit's kept elements, from the whole |τ|; L1 rescale factors, Model Stock's cosines); the
second reads the inputs again block by block, combines the blocks (the native kernel of
:mod:`surgeon.ops.native_gta` for ties/breadcrumbs/magnitude_prune/task arithmetic with
λ or normalisation, else :mod:`surgeon.ops.combine`'s torch code, same bits) and hands each
finished block to the caller. Peak memory: for the magnitude methods one |τ| and its index
scratch (8 bytes per element) and a keep mask per input (1 byte per element), else a few blocks
per input, whatever the number of inputs. τ of a fine-tune is θ − θ_base in float32, never written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy
import torch

from surgeon.errors import OptionError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import pread_into, torch_dtype
from surgeon.ops import combine as C
from surgeon.ops import native_gta
from surgeon.ops.counter_rng import stream_key
from surgeon.ops.task_vector import abs_max
from surgeon.ops.threads import torch_threads
from surgeon.workflows.taskvec.method_specs import METHODS, RANDOM_METHODS, MethodSpec
from surgeon.workflows.taskvec.raw_blocks import RAW as _RAW
from surgeon.workflows.taskvec.raw_blocks import ScratchPool, read_raw

BLOCK_ELEMENTS = 1 << 20  # ~4 MB of float32 per block and input
TERMS_AT_ONCE_BYTES = 1 << 28  # magnitude selections of several inputs run at once below this much scratch


@dataclass(frozen=True)
class ApplyOptions:
    """Method and parameters, with mergekit's names (``lambda_scale`` is mergekit's ``lambda``).

    ``normalize``/``rescale`` None take the method's default; ``density`` 1 keeps every value.
    """

    method: str = "task_arithmetic"
    density: float = 1.0
    epsilon: float = 0.15
    gamma: float = 0.01
    lambda_scale: float = 1.0
    normalize: bool | None = None
    rescale: bool | None = None
    majority_sign: str = "total"
    seed: int = 0
    t: float = 0.5

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    def resolved(self) -> dict[str, object]:
        """The parameters that act for this method (recorded in provenance and the card)."""
        spec = self.spec
        out: dict[str, object] = {"method": self.method}
        if spec.kind == "slerp":
            return {**out, "t": self.t}
        if spec.kind == "model_stock":
            return out
        out.update(lambda_scale=self.lambda_scale, normalize=self.normalize_on)
        if spec.sparsify:
            out.update(density=self.density, rescale=self.rescale_on)
        if spec.sparsify == "magnitude_outliers":
            out["gamma"] = self.gamma
        if spec.sparsify == "della":
            out["epsilon"] = self.epsilon
        if spec.consensus:
            out["majority_sign"] = self.majority_sign
        if self.method in RANDOM_METHODS:
            out["seed"] = self.seed
        return out

    @property
    def normalize_on(self) -> bool:
        return self.spec.normalize if self.normalize is None else self.normalize

    @property
    def rescale_on(self) -> bool:
        return self.spec.rescale if self.rescale is None else self.rescale


def check_options(options: ApplyOptions, inputs: int) -> None:
    """One-line errors for a method and parameters that cannot work, before anything is read."""
    if options.method not in METHODS:
        raise OptionError(f"--method {options.method!r} is not a method apply knows; use one of {', '.join(METHODS)}.")
    if not (0.0 < options.density <= 1.0) or math.isnan(options.density):
        raise OptionError(f"--density {options.density:g} is outside (0, 1]; it is the fraction of each task "
                          "vector kept, e.g. --density 0.5.")
    if options.majority_sign not in ("total", "frequency"):
        raise OptionError(f"--majority-sign {options.majority_sign!r}: use total or frequency.")
    spec = options.spec
    if spec.sparsify == "della" and options.density < 1 and not (
            0 < options.density - options.epsilon and options.density + options.epsilon < 1):
        raise OptionError(f"--epsilon {options.epsilon:g} with --density {options.density:g}: DELLA needs "
                          "density ± epsilon inside (0, 1); lower --epsilon.")
    if spec.kind == "slerp" and inputs != 1:
        raise OptionError(f"slerp interpolates two models, BASE and one INPUT, but {inputs} inputs were given; "
                          "pass exactly one (or use --method task_arithmetic for more).")
    if spec.kind == "model_stock" and inputs < 2:
        raise OptionError(f"model_stock needs at least two fine-tunes of BASE, got {inputs}; add another INPUT.")
    for name in ("t", "lambda_scale", "epsilon", "gamma"):
        if not math.isfinite(getattr(options, name)):
            raise OptionError(f"--{name.replace('_', '-')} must be a finite number.")


@dataclass(frozen=True)
class Term:
    """One input acting on one tensor: its checkpoint, weight, and whether it holds τ or a fine-tune θ."""

    ckpt: Checkpoint
    weight: float
    finetune: bool
    index: int


def read_block(ckpt: Checkpoint, name: str, start: int, stop: int) -> torch.Tensor:
    """Flat elements [start, stop) of a stored tensor as float32 (read with pread, nothing else loaded)."""
    info = ckpt.info(name)
    dtype = torch_dtype(info.dtype)
    item = torch.empty((), dtype=dtype).element_size()
    buf = bytearray((stop - start) * item)
    if buf:
        fd, offset, _ = ckpt.fd_and_span(name)
        pread_into(fd, memoryview(buf), offset + start * item, info.file)
        return torch.frombuffer(buf, dtype=dtype).to(torch.float32)
    return torch.empty(0, dtype=torch.float32)


@dataclass
class TensorMerge:
    """One output tensor: prepare() runs the first sweep, run(emit) the second, block by block."""

    base: Checkpoint
    name: str
    terms: Sequence[Term]
    options: ApplyOptions
    rules: dict[int, C.KeepRule] = field(default_factory=dict)
    active: list[Term] = field(default_factory=list)
    stock_ratio: float = 0.0
    slerp: tuple[float, float] = (0.5, 0.5)
    pool: Executor | None = None  # blocks are independent: workers each run single-threaded torch ops
    block_elements: int = BLOCK_ELEMENTS
    out_dtype: str | None = None  # the output's dtype: the native kernel rounds to it (else blocks are float32)
    scratch: ScratchPool | None = None  # |τ| and index buffers reused from tensor to tensor

    def _map(self, fn: Callable[[tuple[int, int]], Any]) -> list[Any]:
        spans = list(self.spans())
        if self.pool is None or len(spans) == 1:
            return [fn(span) for span in spans]
        return list(self.pool.map(fn, spans))

    @property
    def width(self) -> int:
        shape = self.base.info(self.name).shape
        if len(shape) <= 1:  # a vector is one row for DELLA's ranks
            return max(1, math.prod(shape)) if self.options.spec.sparsify == "della" else 1
        return math.prod(shape[1:])

    def spans(self) -> Iterator[tuple[int, int]]:
        numel = self.base.info(self.name).numel
        step = max(1, self.block_elements // self.width) * self.width
        for start in range(0, numel, step):
            yield start, min(numel, start + step)

    def tau(self, term: Term, start: int, stop: int, base_block: torch.Tensor | None) -> torch.Tensor:
        if term.finetune:
            base_block = read_block(self.base, self.name, start, stop) if base_block is None else base_block
            return read_block(term.ckpt, self.name, start, stop).sub_(base_block)  # as mergekit: θ − θ_base
        return read_block(term.ckpt, self.name, start, stop)

    def rows(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(-1, self.width)

    def prepare(self) -> bool:
        """First sweep; False when every τ is zero here (the tensor is then copied from the base)."""
        spec = self.options.spec
        for ckpt in [self.base, *(t.ckpt for t in self.terms)]:
            ckpt.fd_and_span(self.name)  # open the files here, not racing in the worker threads
        magnitude = spec.sparsify in ("magnitude", "magnitude_outliers") and self.options.density < 1
        scratch = 9 * self.base.info(self.name).numel * len(self.terms)
        if magnitude and self.pool is not None and len(self.terms) > 1 and scratch <= TERMS_AT_ONCE_BYTES:
            found = list(self.pool.map(lambda term: self._prepare_term(term, spec, blocks_at_once=False), self.terms))
        else:
            found = [self._prepare_term(term, spec) for term in self.terms]
        self.active.extend(term for term, ok in zip(self.terms, found) if ok)
        if spec.kind == "model_stock" and self.active:
            self.stock_ratio = self._stock_ratio()
        if spec.kind == "slerp" and self.active:
            self.slerp = self._slerp_coefficients()
        return bool(self.active)

    def _prepare_term(self, term: Term, spec: MethodSpec, *, blocks_at_once: bool = True) -> bool:
        opts = self.options
        sparse = spec.sparsify if opts.density < 1 else None
        if sparse in ("magnitude", "magnitude_outliers"):
            return self._prepare_magnitude(term, sparse, blocks_at_once)
        key = stream_key(opts.seed, self.name, term.index)
        rule = C.KeepRule("all") if sparse is None else C.KeepRule(
            "random" if sparse == "random" else "della", density=opts.density, epsilon=opts.epsilon, key=key)

        def scan(span: tuple[int, int]) -> tuple[bool, float, float]:
            start, stop = span
            block = self.tau(term, start, stop, None)
            nonzero = abs_max(block) != 0.0
            if sparse is not None and opts.rescale_on:
                kept = C.sparsify_block(self.rows(block), rule, start)
                return nonzero, float(block.abs().sum(dtype=torch.float64)), float(kept.abs().sum(dtype=torch.float64))
            return nonzero, 0.0, 0.0

        found = self._map(scan)
        if not any(f[0] for f in found):
            return False
        if sparse is not None and opts.rescale_on:
            rule = C.KeepRule(rule.kind, density=rule.density, epsilon=rule.epsilon, key=rule.key,
                              scale=C.l1_scale(sum(f[1] for f in found), sum(f[2] for f in found)))
        self.rules[term.index] = rule
        return True

    def _fill_abs(self, term: Term, full_abs: torch.Tensor, blocks_at_once: bool) -> tuple[bool, float]:
        """|τ| of the whole tensor into ``full_abs`` with torch: (any non-zero, Σ|τ| in float64)."""
        def scan(span: tuple[int, int]) -> tuple[bool, float]:
            start, stop = span
            block = self.tau(term, start, stop, None)
            torch.abs(block, out=full_abs[start:stop])
            return abs_max(block) != 0.0, float(full_abs[start:stop].sum(dtype=torch.float64))

        found = self._map(scan) if blocks_at_once else [scan(span) for span in self.spans()]
        return any(f[0] for f in found), sum(f[1] for f in found)

    def _fill_pairs(self, lib: Any, term: Term, pairs: numpy.ndarray, blocks_at_once: bool) -> tuple[bool, float]:
        """(|τ|, index) pairs of the whole tensor from the native kernel: (any non-zero, Σ|τ| in float64)."""
        b_dtype, t_dtype = self.base.info(self.name).dtype, term.ckpt.info(self.name).dtype

        def scan(span: tuple[int, int]) -> tuple[bool, float]:
            start, stop = span
            base = read_raw(self.base, self.name, start, stop) if term.finetune else None
            return native_gta.tau_abs_pairs(lib, read_raw(term.ckpt, self.name, start, stop), t_dtype, base,
                                            b_dtype, pairs[start:stop], start, l1=self.options.rescale_on)

        found = self._map(scan) if blocks_at_once else [scan(span) for span in self.spans()]
        return any(f[0] for f in found), sum(f[1] for f in found)

    def _prepare_magnitude(self, term: Term, sparse: str, blocks_at_once: bool) -> bool:
        """mergekit's magnitude sparsification: the kept elements decided from the whole |τ|, exactly."""
        opts, numel = self.options, self.base.info(self.name).numel
        lib = self._native()
        if lib is None:
            full_abs = torch.empty(numel, dtype=torch.float32)
            nonzero, before = self._fill_abs(term, full_abs, blocks_at_once)
            kept, after = (C.magnitude_mask(full_abs, opts.density, method=sparse, gamma=opts.gamma) if nonzero
                           else (None, 0.0))
        else:
            with (self.scratch or ScratchPool()).take(numel) as pairs:
                nonzero, before = self._fill_pairs(lib, term, pairs, blocks_at_once)
                kept, after = C.magnitude_mask_pairs(
                    pairs, opts.density, method=sparse, gamma=opts.gamma,
                    values=lambda: self._refilled(term, numel)) if nonzero else (None, 0.0)
        if not nonzero:
            return False
        scale = C.l1_scale(before, after) if opts.rescale_on else 1.0
        self.rules[term.index] = C.KeepRule("mask", density=opts.density, scale=scale, mask=kept)
        return True

    def _refilled(self, term: Term, numel: int) -> torch.Tensor:
        full_abs = torch.empty(numel, dtype=torch.float32)
        self._fill_abs(term, full_abs, blocks_at_once=False)
        return full_abs

    def _native(self) -> Any:
        """The native kernels when every dtype here is one they read (F32/F16/BF16), else None."""
        dtypes = {self.base.info(self.name).dtype, *(t.ckpt.info(self.name).dtype for t in self.terms)}
        return native_gta.kernel() if dtypes <= set(_RAW) else None

    def _stock_ratio(self) -> float:
        count = len(self.terms)
        dots = [[0.0] * count for _ in range(count)]
        for start, stop in self.spans():
            base_block = read_block(self.base, self.name, start, stop)
            taus = [self.tau(term, start, stop, base_block).double() for term in self.terms]
            for i in range(count):
                for j in range(i, count):
                    dots[i][j] += float(torch.dot(taus[i], taus[j]))
        norms = [math.sqrt(max(dots[i][i], 0.0)) for i in range(count)]
        return C.model_stock_ratio([[dots[min(i, j)][max(i, j)] for j in range(count)] for i in range(count)], norms)

    def _slerp_coefficients(self) -> tuple[float, float]:
        sums = [0.0, 0.0, 0.0]  # ‖v0‖², ‖v1‖², ⟨v0, v1⟩ over the whole tensor
        for start, stop in self.spans():
            v0 = read_block(self.base, self.name, start, stop)
            v1 = self._theta(self.terms[0], start, stop, v0).double()  # float64 sums: the split hardly matters
            v0 = v0.double()
            sums[0] += float(torch.dot(v0, v0))
            sums[1] += float(torch.dot(v1, v1))
            sums[2] += float(torch.dot(v0, v1))
        return C.slerp_coefficients(self.options.t, math.sqrt(sums[0]), math.sqrt(sums[1]), sums[2])

    def run(self, emit: Callable[[int, torch.Tensor], None]) -> None:
        """Second sweep: ``emit(flat start, float32 output block)`` for every block (from worker threads, in
        any order, when there is a pool)."""
        combine = {"gta": self._gta, "slerp": self._slerp, "model_stock": self._stock}[self.options.spec.kind]
        lib = self._native_combine()

        def one(span: tuple[int, int]) -> None:
            start, stop = span
            if lib is not None:
                emit(start, self._gta_native(lib, start, stop))
            else:
                emit(start, combine(read_block(self.base, self.name, start, stop), start, stop))

        self._map(one)

    def _native_combine(self) -> Any:
        """The native kernel for this tensor's second sweep, or None: generalized task arithmetic with kept
        sets decided up front (all or magnitude masks), F32/F16/BF16 in and out, not the plain weighted sum
        (whose order of operations is the historical one)."""
        opts = self.options
        if (opts.spec.kind != "gta" or self.out_dtype not in _RAW or len(self.active) > native_gta.MAX_INPUTS
                or any(self.rules[t.index].kind not in ("all", "mask") for t in self.active)
                or (opts.method == "task_arithmetic" and not opts.normalize_on and opts.lambda_scale == 1)):
            return None
        return self._native()

    def _gta_native(self, lib: Any, start: int, stop: int) -> torch.Tensor:
        """One output block computed and rounded by the native kernel, in the output dtype."""
        opts, name = self.options, self.name
        rules = [self.rules[t.index] for t in self.active]
        consensus = (1 if opts.majority_sign == "total" else 2) if opts.spec.consensus else 0
        weight_sum = sum(t.weight for t in self.terms)
        out = numpy.empty(stop - start, dtype=_RAW[self.out_dtype])
        native_gta.gta_block(
            lib, read_raw(self.base, name, start, stop), self.base.info(name).dtype,
            [(read_raw(t.ckpt, name, start, stop), t.ckpt.info(name).dtype, t.finetune) for t in self.active],
            [None if r.mask is None else r.mask.numpy() for r in rules], start, [r.scale for r in rules],
            [t.weight for t in self.active], consensus=consensus, normalize=opts.normalize_on,
            divisor=1.0 if abs(weight_sum) < 1e-8 else weight_sum,
            lambda_scale=opts.lambda_scale, out=out, out_dtype=self.out_dtype)
        return torch.from_numpy(out).view(torch_dtype(self.out_dtype))

    def _gta(self, base_block: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        opts = self.options
        if opts.method == "task_arithmetic" and not opts.normalize_on and opts.lambda_scale == 1:
            out = base_block.clone()  # the historical order: θ_base, then + λ_i·τ_i one at a time
            for term in self.active:
                out.add_(self.tau(term, start, stop, base_block), alpha=term.weight)
            return out
        deltas = []
        for term in self.active:
            kept = C.sparsify_block(self.rows(self.tau(term, start, stop, base_block)), self.rules[term.index], start)
            deltas.append(kept.reshape(-1).mul_(term.weight))  # kept is a fresh tensor (τ was read for it)
        consensus = ("sum" if opts.majority_sign == "total" else "count") if opts.spec.consensus else None
        # without a sign election mergekit divides by Σw of every input that has the tensor, zero τ or not
        weights = [t.weight for t in self.active] if consensus else [sum(t.weight for t in self.terms)]
        mixed = C.consensus_block(deltas, weights, consensus=consensus, normalize=opts.normalize_on,
                                  lambda_scale=opts.lambda_scale)
        return base_block + mixed

    def _theta(self, term: Term, start: int, stop: int, base_block: torch.Tensor) -> torch.Tensor:
        if term.finetune:
            return read_block(term.ckpt, self.name, start, stop)
        return base_block + read_block(term.ckpt, self.name, start, stop)

    def _slerp(self, base_block: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        c0, c1 = self.slerp
        return c0 * base_block + c1 * self._theta(self.terms[0], start, stop, base_block)

    def _stock(self, base_block: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        total = torch.zeros_like(base_block)
        for term in self.terms:
            total.add_(self._theta(term, start, stop, base_block))
        ratio = self.stock_ratio
        return ratio * (total / len(self.terms)) + (1 - ratio) * base_block


@contextmanager
def block_workers(workers: int | None = None) -> Iterator[Executor | None]:
    """A pool of ``workers`` threads (default: the CPU count) for the blocks, torch single-threaded inside
    it (one torch op per block and thread beats one op over two threads, most of all on a loaded machine);
    the previous torch thread count is restored on exit."""
    count = workers or os.cpu_count() or 1
    if count <= 1:
        yield None
        return
    with torch_threads(1), ThreadPoolExecutor(max_workers=count, thread_name_prefix="surgeon-apply") as pool:
        yield pool
