"""Provenance: which surgeon version, command and parameters produced an output."""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

from surgeon import __version__

PROVENANCE_FILE = "surgeon_provenance.json"


def provenance(command: str, parameters: dict[str, Any], *, inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """A JSON-able record of one surgeon run."""
    return {
        "surgeon_version": __version__,
        "command": command,
        "parameters": _jsonable(parameters),
        "inputs": dict(inputs or {}),
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }


def safetensors_metadata(record: dict[str, Any]) -> dict[str, str]:
    """The record flattened into safetensors ``__metadata__`` (string values only)."""
    return {
        "surgeon_version": str(record["surgeon_version"]),
        "surgeon_command": str(record["command"]),
        "surgeon_parameters": json.dumps(record["parameters"], sort_keys=True),
        "surgeon_inputs": json.dumps(record.get("inputs", {}), sort_keys=True),
    }


def provenance_file_text(record: dict[str, Any], report: dict[str, Any] | None = None) -> str:
    body = dict(record)
    if report is not None:
        body["report"] = _jsonable(report)
    return json.dumps(body, indent=2, sort_keys=False) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
