"""The execution plan of a merge: for every base tensor, what happens to it, by which route, and how
many bytes it writes. Decided here, from headers and the chosen engine, before anything runs;
``surgeon merge --dry-run`` prints it and :mod:`surgeon.workflows.merge.execute` follows it.

Routes:

- ``native``: LoRA deltas on a 2-D bf16/fp16/fp32 weight on the CPU, through the fused C kernel,
  block by block from the base file into the output file;
- ``stream``: other additive deltas (LoHa, LoKr, VeRA, ...) on the CPU, the same way in torch;
- ``memory``: everything else (DoRA, IA3, HiRA, replacements, any merge on a GPU): the whole
  tensor in memory, W' in float32, rounded once;
- ``module``: a module merged by peft's own layer code (``peft_layer``: OFT, BOFT, VB-LoRA, ...,
  convolutions, MultiheadAttention; OFT on a Linear block by block where that gives peft's bits:
  ``oft_fast``), all of the module's tensors together, in memory;
- ``cast``: an untouched tensor whose dtype changes; ``copy``: an untouched tensor, byte for byte.

All routes give the same bits; they differ in memory and speed only.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from surgeon.errors import OptionError
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.writer import TensorSpec
from surgeon.ops import native_merge
from surgeon.workflows.merge.exactness import Exactness
from surgeon.workflows.merge.plan import MergePlan

ENGINES = ("auto", "native", "torch", "memory")
ADDITIVE = frozenset({"lora", "lora_embedding", "lora_bias", "adalora", "loha", "lokr", "vera"})
STREAM_CHUNK = native_merge.CHUNK  # elements per block when streaming: the one block size, set in ops
_NATIVE_FACTOR_DTYPES = ("F32", "F16", "BF16", "F64")


def engine_from_env() -> str:
    """The engine ``auto`` stands for: the native kernel unless ``SURGEON_NATIVE=0`` (the one place it is read)."""
    return "torch" if os.environ.get("SURGEON_NATIVE", "1") == "0" else "native"


@dataclass(frozen=True)
class TensorRoute:
    """One output tensor: ``action`` (merge, replace, cast, copy), ``route`` (native, stream, memory, cast,
    copy), the output ``dtype``, the bytes it writes and the operations acting on it."""

    name: str
    action: str
    route: str
    dtype: str
    nbytes: int
    operations: str = ""


@dataclass(frozen=True)
class RoutePlan:
    """Every tensor's route, in the base's order. ``positional``: every tensor is merged in place or copied
    as is, so copies may go to their reserved places in the background. ``kernel``: the loaded native
    kernel when some tensor takes the native route."""

    device: str
    engine: str
    tensors: tuple[TensorRoute, ...]
    positional: bool
    workers: int
    chunk: int
    kernel: Any = field(default=None, compare=False, repr=False)
    measured: int = 0  # shapes whose exact route was measured on this machine while planning (then remembered)

    @property
    def by_name(self) -> dict[str, TensorRoute]:
        return {t.name: t for t in self.tensors}

    def names(self, *routes: str) -> list[str]:
        return [t.name for t in self.tensors if t.route in routes]

    @property
    def torch_needed(self) -> bool:
        return any(t.route not in ("native", "copy") for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.route] = counts.get(t.route, 0) + 1
        return {"device": self.device, "engine": self.engine, "workers": self.workers, "chunk": self.chunk,
                "bytes_out": self.bytes_out, "routes": counts, "measured_shapes": self.measured,
                "tensors": [asdict(t) for t in self.tensors]}

    @property
    def notes(self) -> list[str]:
        if not self.measured:
            return []
        return [f"measured on this machine which route gives peft's bits for {self.measured} LoRA shape(s) "
                "(once: remembered for later merges)"]


def cpu_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on every platform
        return max(1, os.cpu_count() or 1)


def _lora_ranks(ckpt: Checkpoint, plan: MergePlan, name: str) -> list[int] | None:
    """The ranks of the LoRA deltas on 2-D target ``name`` when the streamed routes may compute them (every
    operation a LoRA whose factors the kernel reads); None otherwise."""
    info = ckpt.info(name)
    if len(info.shape) != 2 or info.numel == 0:
        return None
    ranks = []
    for op in plan.targets[name]:
        weights = plan.adapters[op.adapter].weights
        if op.kind != "lora" or any(weights.info(op.tensors[role]).dtype not in _NATIVE_FACTOR_DTYPES
                                    for role in ("lora_A", "lora_B")):
            return None
        ranks.append(weights.info(op.tensors["lora_A"]).shape[0])
    return ranks


def _native_fits(ckpt: Checkpoint, plan: MergePlan, name: str, out_dtype: str, exact: Exactness) -> bool:
    """Whether the native kernel merges this target: LoRA deltas only, on a 2-D bf16/fp16/fp32 weight, of a
    shape where it gives peft's bits on this machine (measured)."""
    info = ckpt.info(name)
    ranks = _lora_ranks(ckpt, plan, name)
    if ranks is None or not {info.dtype, out_dtype} <= set(native_merge.DTYPE_CODES):
        return False
    rows, cols = info.shape
    return exact.native(rows, cols, ranks, fan_in_fan_out=plan.targets[name][0].fan_in_fan_out)


def _blocks_exact(ckpt: Checkpoint, plan: MergePlan, name: str, exact: Exactness) -> bool:
    """Whether the torch stream gives peft's bits here: its LoRA products, one block of rows at a time, equal
    the whole product on this machine (measured); other additive deltas are computed whole, always exact."""
    ops = plan.targets[name]
    lora = [op for op in ops if op.kind == "lora"]
    info = ckpt.info(name)
    if not lora or len(info.shape) != 2:
        return True
    ranks = [plan.adapters[op.adapter].weights.info(op.tensors["lora_A"]).shape[0] for op in lora]
    rows, cols = info.shape
    return exact.blocks(rows, cols, ranks, fan_in_fan_out=lora[0].fan_in_fan_out)


def _kernel_for(engine: str, wanted: bool) -> Any:
    if engine != "native" or not wanted:
        return None
    return native_merge.kernel()


def plan_routes(ckpt: Checkpoint, plan: MergePlan, dtypes: dict[str, str], *, device: str, engine: str = "auto",
                chunk: int = STREAM_CHUNK) -> RoutePlan:
    """The route of every base tensor. ``engine``: auto (``SURGEON_NATIVE`` decides), native (the C kernel
    where it fits, torch elsewhere), torch (no kernel) or memory (every merged tensor whole, in memory)."""
    if engine not in ENGINES:
        raise OptionError(f"engine {engine!r} is not one of {', '.join(ENGINES)}.")
    resolved = engine_from_env() if engine == "auto" else engine
    on_cpu = device == "cpu"
    lib = _kernel_for(resolved, on_cpu and bool(plan.targets))
    if engine == "native" and on_cpu and plan.targets and lib is None:
        raise OptionError(f"the native merge kernel cannot be used here ({native_merge.build_error()}); "
                          "use the torch engine (SURGEON_NATIVE=0).")
    workers = cpu_workers() if on_cpu else 1
    exact = Exactness(lib, chunk=chunk, workers=workers)
    routes = []
    for name in ckpt.keys():
        info, dtype = ckpt.info(name), dtypes[name]
        nbytes = TensorSpec(name, dtype, info.shape).nbytes
        ops = plan.targets.get(name)
        if ops is None:
            route = "copy" if dtype == info.dtype else "cast"
            routes.append(TensorRoute(name, route, route, dtype, nbytes))
            continue
        action = "replace" if all(op.kind in ("replace", "base_layer") for op in ops) else "merge"
        if any(op.kind == "peft_module" for op in ops):
            route = "module"
        elif lib is not None and _native_fits(ckpt, plan, name, dtype, exact):
            route = "native"
        elif on_cpu and resolved != "memory" and all(op.kind in ADDITIVE for op in ops) and \
                _blocks_exact(ckpt, plan, name, exact):
            route = "stream"
        else:
            route = "memory"
        routes.append(TensorRoute(name, action, route, dtype, nbytes, plan.describe(name)))
    positional = all(t.route in ("native", "stream", "module", "copy") for t in routes) and \
        all(dtypes[n] == ckpt.info(n).dtype for n in ckpt.keys())
    used = lib if any(t.route == "native" for t in routes) else None
    return RoutePlan(device, resolved, tuple(routes), positional, workers, chunk, used, exact.measured)
