"""Training and evaluation data for `surgeon finetune` and `surgeon eval`: JSONL or CSV.

A file holds one example per line (JSONL: one JSON object a line; CSV/TSV: a
header row). Classification needs ``text`` and ``label``; causal-LM data needs
``text``, or ``prompt`` and ``completion`` (the loss then covers only the
completion). Every problem is a :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgeon.errors import DataError
from surgeon.io.output import note_input
from surgeon.io.textfile import read_regular_bytes

TASKS = ("classification", "causal-lm")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}


@dataclass(frozen=True)
class Example:
    """One example: ``text`` (classification, plain LM) or ``prompt`` + ``completion``."""

    text: str
    label: str | None = None
    prompt: str | None = None
    completion: str | None = None


@dataclass(frozen=True)
class TaskData:
    """The examples of one file and, for classification, its sorted label names."""

    path: str
    task: str
    examples: tuple[Example, ...]
    labels: tuple[str, ...] | None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]

    def label_ids(self, labels: tuple[str, ...] | list[str]) -> list[int]:
        """Each example's label as an index into ``labels``."""
        index = {name: i for i, name in enumerate(labels)}
        return [index[e.label] for e in self.examples if e.label is not None]


def load_task_data(
    path: str | os.PathLike[str], task: str, *, labels: tuple[str, ...] | list[str] | None = None
) -> TaskData:
    """Read and validate ``path`` for ``task``.

    ``labels``: the training label names; an evaluation file whose labels are
    not among them is refused (a model cannot predict a class it never saw).
    """
    if task not in TASKS:
        raise DataError(f"--task {task!r} is not a task surgeon trains; use one of: {', '.join(TASKS)}.")
    p = Path(path)
    note_input(p)
    rows = _read_rows(p)
    if not rows:
        raise DataError(f"{p}: holds no examples (the file is empty); give a file with one example per line.")
    examples = tuple(_example(p, line, row, task) for line, row in rows)
    found = _sorted_labels({e.label for e in examples if e.label is not None}) if task == "classification" else None
    if task == "classification":
        if labels is None and found is not None and len(found) < 2:
            raise DataError(f"{p}: every example has label {found[0]!r}; classification needs at least two labels.")
        if labels is not None:
            _check_known_labels(p, rows, examples, labels)
    return TaskData(str(p), task, examples, tuple(labels) if labels is not None else found)


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs; blank lines are skipped."""
    if not path.exists():
        raise DataError(f"{path}: no such data file; check the path.")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a .jsonl or .csv file.")
    suffix = path.suffix.lower()
    raw = read_regular_bytes(path, what="data file", error=DataError)  # a FIFO or device: one line, no wait
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.") from None
    if suffix in _JSONL_SUFFIXES:
        return _jsonl_rows(path, text)
    if suffix in _CSV_SUFFIXES:
        return _csv_rows(path, text, _CSV_SUFFIXES[suffix])
    raise DataError(f"{path}: unknown data format {suffix or '(no suffix)'!r}; use .jsonl (one JSON object a line) or .csv with a header row.")


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array of objects is accepted too
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); write one JSON object per line.") from None
        rows = [(i + 1, item) for i, item in enumerate(items)]
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg}); write one JSON object per line.") from None
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object; write lines like {{\"text\": \"...\", \"label\": \"...\"}}.")
    return rows


def _csv_rows(path: Path, text: str, delimiter: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    if reader.fieldnames is None:
        return []
    rows = []
    for row in reader:
        if None in row:
            raise DataError(f"{path}: line {reader.line_num} has more fields than the header ({len(reader.fieldnames)}); quote fields that contain '{delimiter}'.")
        if all(not (v or "").strip() for v in row.values()):
            continue
        rows.append((reader.line_num, {k.strip(): v for k, v in row.items()}))
    return rows


def _field(path: Path, line: int, row: dict[str, Any], name: str, need: str) -> str:
    if name not in row:
        found = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"{path}: line {line} has no {name!r} column (found: {found}); {need}.")
    value = row[name]
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        raise DataError(f"{path}: line {line}: {name!r} is {json.dumps(value)}, expected text; fix the value.")
    text = str(value)
    if not text.strip():
        raise DataError(f"{path}: line {line}: {name!r} is empty; remove the line or fill it in.")
    return text


def _example(path: Path, line: int, row: dict[str, Any], task: str) -> Example:
    if task == "classification":
        need = "classification data needs 'text' and 'label' columns"
        text = _field(path, line, row, "text", need)
        label = _field(path, line, row, "label", need).strip()
        return Example(text=text, label=label)
    if "prompt" in row or "completion" in row:
        need = "causal-LM data needs 'text', or 'prompt' and 'completion' columns"
        prompt = _field(path, line, row, "prompt", need)
        completion = _field(path, line, row, "completion", need)
        return Example(text=prompt + completion, prompt=prompt, completion=completion)
    return Example(text=_field(path, line, row, "text", "causal-LM data needs 'text', or 'prompt' and 'completion' columns"))


def _sorted_labels(found: set[str]) -> tuple[str, ...]:
    """Numeric labels sort as numbers (0, 1, 2, 10), anything else alphabetically."""
    if all(_is_int(x) for x in found):
        return tuple(sorted(found, key=int))
    return tuple(sorted(found))


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _check_known_labels(path: Path, rows: list[tuple[int, dict[str, Any]]], examples: tuple[Example, ...],
                        labels: tuple[str, ...] | list[str]) -> None:
    known = set(labels)
    for (line, _), example in zip(rows, examples):
        if example.label not in known:
            raise DataError(
                f"{path}: line {line}: label {example.label!r} is not among the training labels "
                f"({', '.join(labels)}); fix the label or add examples of it to the training data."
            )
