"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

Read straight from the files: no peft model object, no transformers model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgeon.errors import AdapterError, CheckpointNotFoundError
from surgeon.io.checkpoint import PICKLE_SUFFIXES, Checkpoint, _refuse_pickle

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_folder(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT adapter config surgeon uses (``raw`` keeps everything)."""

    peft_type: str
    r: int | None
    alpha: float | None
    target_modules: list[str] | str | None
    modules_to_save: list[str] | None
    base_model: str | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AdapterConfig:
        peft_type = str(raw.get("peft_type", "")).upper()
        r = raw.get("r", raw.get("init_r"))
        alpha = raw.get("lora_alpha", raw.get("alpha"))
        targets = raw.get("target_modules")
        if isinstance(targets, (set, tuple)):
            targets = sorted(targets)
        return cls(
            peft_type=peft_type,
            r=int(r) if isinstance(r, (int, float)) else None,
            alpha=float(alpha) if isinstance(alpha, (int, float)) else None,
            target_modules=targets,
            modules_to_save=list(raw["modules_to_save"]) if raw.get("modules_to_save") else None,
            base_model=raw.get("base_model_name_or_path"),
            raw=raw,
        )


class Adapter:
    """An adapter folder: its config and a lazily read :class:`Checkpoint` of its weights."""

    def __init__(self, folder: Path, config: AdapterConfig, weights: Checkpoint) -> None:
        self.folder = folder
        self.config = config
        self.weights = weights

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Adapter:
        folder = Path(path)
        if not folder.exists():
            raise CheckpointNotFoundError(f"{folder}: no such adapter folder; check the path.")
        if not folder.is_dir() or not (folder / ADAPTER_CONFIG).is_file():
            raise AdapterError(
                f"{folder}: not a PEFT adapter folder (no {ADAPTER_CONFIG}); give the folder that "
                "save_pretrained() wrote for the adapter."
            )
        try:
            raw = json.loads((folder / ADAPTER_CONFIG).read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterError(f"{folder / ADAPTER_CONFIG}: not valid JSON ({exc}); re-download or re-save the adapter.") from None
        if not isinstance(raw, dict):
            raise AdapterError(f"{folder / ADAPTER_CONFIG}: expected a JSON object.")
        weights_path = folder / ADAPTER_WEIGHTS
        if not weights_path.is_file():
            pickles = [p for p in folder.iterdir() if p.name.startswith("adapter_model") and p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise _refuse_pickle(pickles[0])
            raise AdapterError(f"{folder}: {ADAPTER_WEIGHTS} is missing; re-download or re-save the adapter.")
        return cls(folder, AdapterConfig.from_dict(raw), Checkpoint.open(weights_path))

    def close(self) -> None:
        self.weights.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
