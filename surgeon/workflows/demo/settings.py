"""The demo's knobs and the state its stages hand on (shared by `run` and `stages`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DemoSettings:
    """Knobs of the demo; the defaults keep MiniLM under 10 minutes on 2 CPU cores."""

    epochs: int = 3
    batch_size: int = 16
    max_length: int = 32
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_lr: float = 3e-3
    full_lr: float = 5e-5
    top_k: int = 10
    epsilon: float = 0.5
    lambdas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lambdas"] = list(self.lambdas)
        return d


@dataclass
class DemoRun:
    """The state handed from stage to stage: where things are and what was found."""

    out: Path
    base: Path
    base_name: str
    data: Path | None
    settings: DemoSettings
    results: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)

    def rel(self, path: Path) -> str:
        """``path`` relative to the output folder, for the report."""
        try:
            return str(path.relative_to(self.out))
        except ValueError:
            return str(path)
