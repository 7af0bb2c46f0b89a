"""Model cards (README.md) that record the surgery, built from ``surgeon_provenance.json``.

The card has YAML front matter the Hub understands (``base_model``,
``base_model_relation``, ``library_name``, ``license``, ``tags``) and a body
section, between ``<!-- surgeon:begin -->`` and ``<!-- surgeon:end -->``,
with the command, parameters, inputs with revisions and, for
``scale-intruders``, the per-layer intruder table. Updating an existing card
merges the front matter and replaces only that section.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from surgeon.errors import CheckpointFormatError, OptionError
from surgeon.io import hub
from surgeon.provenance import PROVENANCE_FILE

BEGIN, END = "<!-- surgeon:begin -->", "<!-- surgeon:end -->"
_FRONT = re.compile(r"\A---[ \t]*\n(.*?\n)?---[ \t]*(?:\n|\Z)", re.S)
_CACHE_PATH = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<commit>[0-9a-f]{40})")
_REPAIRS = {"scale-intruders"}  # the output is the first non-base input, repaired
_LICENSE_KEYS = ("license", "license_name", "license_link")
_MAX_TABLE_ROWS = 500


@dataclass(frozen=True)
class CardInput:
    """One input of the surgery, as recorded and as resolved against the Hub cache."""

    role: str
    arg: str
    repo_id: str | None  # None for a local path
    revision: str | None
    commit: str | None


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """The folder's ``surgeon_provenance.json``, or None when it has none."""
    path = folder / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{path}: not valid JSON ({exc}); re-run the command that wrote the folder.") from None
    if not isinstance(data, dict) or "command" not in data:
        raise CheckpointFormatError(f"{path}: not a surgeon provenance record (no 'command'); re-run the command.")
    return data


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """``(metadata, body)`` of a card; metadata is {} when there is none or it is not a mapping."""
    m = _FRONT.match(text)
    if m is None:
        return {}, text
    try:
        data = yaml.safe_load(m.group(1) or "") or {}
    except yaml.YAMLError:
        return {}, text[m.end():]
    return (data if isinstance(data, dict) else {}), text[m.end():]


def card_inputs(record: dict[str, Any]) -> list[CardInput]:
    """The recorded inputs (values may be a string or a list of strings), resolved to Hub refs where they are."""
    out = []
    revisions = record.get("input_revisions") or {}
    for role, value in (record.get("inputs") or {}).items():
        values = value if isinstance(value, list) else _maybe_json_list(value)
        for i, arg in enumerate(values):
            name = role if len(values) == 1 else f"{role}[{i}]"
            out.append(_card_input(name, str(arg), revisions.get(name)))
    return out


def _maybe_json_list(value: Any) -> list[Any]:
    if isinstance(value, str) and value.startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return [value]
        if isinstance(parsed, list):
            return parsed
    return [value]


def _card_input(role: str, arg: str, known: Any) -> CardInput:
    m = _CACHE_PATH.search(arg)
    if m is not None:
        return CardInput(role, arg, f"{m['org']}/{m['name']}", m["commit"], m["commit"])
    parsed = hub.parse_hub_arg(arg)
    if parsed is None or Path(arg).exists():
        return CardInput(role, arg, None, None, None)
    repo_id, rev = parsed
    if not isinstance(known, dict) and rev is None:  # fetched by this process (e.g. --push-to): its --revision
        ref = hub.last_resolved(repo_id)
        known = {"revision": ref.revision, "commit": ref.commit} if ref is not None else None
    commit = known.get("commit") if isinstance(known, dict) else None
    revision = (known.get("revision") if isinstance(known, dict) else None) or rev or "main"
    return CardInput(role, arg, repo_id, revision, commit or hub.cached_commit(repo_id, revision))


def card_metadata(folder: Path, record: dict[str, Any] | None, *, base_model: str | None = None) -> dict[str, Any]:
    """Front matter for a surgeon output folder.

    ``base_model`` (``push --base-model``) names the Hub model the folder derives from when its
    provenance records none; without it, ``config.json``'s ``_name_or_path`` (or an adapter's
    ``base_model_name_or_path``) is used when that is a Hub repo id. A local path never goes in.
    """
    is_adapter = (folder / "adapter_config.json").is_file()
    meta: dict[str, Any] = {}
    bases: list[CardInput] = []
    relation = "adapter" if is_adapter else "finetune"
    if record is not None:
        inputs = card_inputs(record)
        bases, relation = _lineage(record["command"], inputs, is_adapter)
    hub_bases = [i.repo_id for i in bases if i.repo_id]
    if hub_bases and base_model is not None and base_model not in hub_bases:
        raise OptionError(f"--base-model {base_model}: {folder}'s provenance already records the Hub base "
                          f"{', '.join(hub_bases)}; drop --base-model.")
    if not hub_bases:
        named = base_model or _named_base(folder, is_adapter)
        if named is not None:
            hub_bases = [named]
    if hub_bases:
        meta["base_model"] = hub_bases[0] if len(hub_bases) == 1 else hub_bases
        meta["base_model_relation"] = relation
    license_meta = _base_license(bases[0]) if bases else {}
    meta.update(license_meta)
    if is_adapter:
        meta["library_name"] = "peft"
    elif (folder / "config.json").is_file():
        meta["library_name"] = "transformers"
    meta["tags"] = ["surgeon"] + ([str(record["command"])] if record is not None else [])
    return meta


def check_base_model(value: str) -> str:
    """``--base-model``: a Hub repo id (``org/name``), never a local path or a revision."""
    if not hub.is_repo_id(value) or Path(value).exists():
        raise OptionError(f"--base-model {value!r}: give the Hub repo id of the base model (org/name, no @revision); "
                          "a local path never goes into a model card.")
    return value


def _named_base(folder: Path, is_adapter: bool) -> str | None:
    """The base a transformers/peft config names, when that is a Hub repo id (not a local path)."""
    name, key = ("adapter_config.json", "base_model_name_or_path") if is_adapter else ("config.json", "_name_or_path")
    try:
        value = json.loads((folder / name).read_text("utf-8")).get(key)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(value, str) or not hub.is_repo_id(value) or Path(value).exists() or value.startswith((".", "/")):
        return None
    return value


def _lineage(command: str, inputs: list[CardInput], is_adapter: bool) -> tuple[list[CardInput], str]:
    """(the models this output derives from, base_model_relation)."""
    base = [i for i in inputs if i.role == "base"]
    others = [i for i in inputs if i.role != "base"]
    if is_adapter:
        return (base or inputs[:1]), "adapter"
    if command in _REPAIRS:
        return (others[:1] or base), "finetune"
    if len(others) <= 1:
        return (base or others), "finetune"
    return base + others, "merge"


def _base_license(base: CardInput) -> dict[str, Any]:
    """license / license_name / license_link from the base model's card, when it is known locally."""
    card = None
    if base.repo_id and base.commit:
        card = hub.cached_file(base.repo_id, base.commit, "README.md")
    elif base.repo_id is None:
        local = Path(base.arg)
        card = (local if local.is_dir() else local.parent) / "README.md"
    if card is None or not card.is_file():
        return {}
    try:
        meta, _ = split_front_matter(card.read_text("utf-8"))
    except (OSError, UnicodeDecodeError):
        return {}
    return {k: meta[k] for k in _LICENSE_KEYS if meta.get(k)}


def render_card(folder: Path, *, repo_id: str, existing: str | None = None, base_model: str | None = None) -> str:
    """The README.md to publish for ``folder`` as ``repo_id``, updating ``existing`` if given."""
    record = read_provenance(folder)
    meta = card_metadata(folder, record, base_model=base_model)
    section = _section(folder, record, repo_id)
    if existing is None:
        body = f"\n# {repo_id.split('/')[-1]}\n\n{section}"
        return _front(meta) + body
    old_meta, old_body = split_front_matter(existing)
    merged = dict(old_meta)
    for key in ("base_model", "base_model_relation", "library_name"):
        if key in meta:
            merged[key] = meta[key]
    for key in _LICENSE_KEYS:
        if key in meta and not merged.get(key):
            merged[key] = meta[key]
    old_tags = old_meta.get("tags") if isinstance(old_meta.get("tags"), list) else []
    merged["tags"] = list(dict.fromkeys([*map(str, old_tags), *meta["tags"]]))
    if BEGIN in old_body and END in old_body:
        head, _, rest = old_body.partition(BEGIN)
        body = head + section.rstrip("\n") + rest.partition(END)[2]
    else:
        body = old_body.rstrip("\n") + "\n\n" + section
    return _front(merged) + ("" if body.startswith("\n") else "\n") + body


def _front(meta: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _section(folder: Path, record: dict[str, Any] | None, repo_id: str) -> str:
    lines = [BEGIN, "## Surgery", ""]
    what = "PEFT adapter" if (folder / "adapter_config.json").is_file() else "checkpoint"
    if record is None:
        lines += [f"This {what} was published with surgeon; the folder carries no {PROVENANCE_FILE}, "
                  "so the operations that produced it are not recorded.", "", END, ""]
        return "\n".join(lines)
    command = str(record["command"])
    lines += [f"This {what} was produced by surgeon {record.get('surgeon_version', '?')} with "
              f"`surgeon {command}` ({record.get('created', 'date unknown')}).", ""]
    params = record.get("parameters") or {}
    if params:
        lines += ["| parameter | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(_fmt(v))} |" for k, v in params.items()] + [""]
    lines += _inputs_table(card_inputs(record))
    if command in _REPAIRS:
        lines += _intruder_table(record.get("report"))
    lines += [f"Full record: [`{PROVENANCE_FILE}`]({PROVENANCE_FILE}).", "", END, ""]
    return "\n".join(lines)


def _inputs_table(inputs: list[CardInput]) -> list[str]:
    if not inputs:
        return []
    lines = ["### Inputs", "", "| role | input | revision | commit |", "|---|---|---|---|"]
    ep = hub.endpoint()
    for i in inputs:
        if i.repo_id:
            lines.append(f"| {_cell(i.role)} | [{i.repo_id}]({ep}/{i.repo_id}) | {_cell(i.revision or 'main')} "
                         f"| {'`' + i.commit + '`' if i.commit else 'unknown'} |")
        else:
            lines.append(f"| {_cell(i.role)} | `{_cell(i.arg)}` | local | - |")
    return lines + [""]


def _intruder_table(report: Any) -> list[str]:
    """Render the per-layer rows of a scale-intruders report (the first list of row objects in it)."""
    rows = _rows(report)
    lines = ["### Intruder dimensions per layer", ""]
    if not rows:
        return lines + ["The run recorded no per-layer table.", ""]
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and _is_cell_value(v)]
    columns = columns[:10]
    lines += ["| " + " | ".join(map(_cell, columns)) + " |", "|" + "---|" * len(columns)]
    for row in rows[:_MAX_TABLE_ROWS]:
        lines.append("| " + " | ".join(_cell(_fmt(row.get(c, ""))) for c in columns) + " |")
    if len(rows) > _MAX_TABLE_ROWS:
        lines.append(f"\n{len(rows) - _MAX_TABLE_ROWS} more rows are in {PROVENANCE_FILE}.")
    return lines + [""]


def _rows(report: Any) -> list[dict[str, Any]]:
    if not isinstance(report, dict):
        return []
    candidates = [report.get(k) for k in ("layers", "matrices", "tensors", "modules")] + list(report.values())
    for value in candidates:
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            return value
    return []


def _is_cell_value(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool)) or (
        isinstance(v, list) and len(v) <= 12 and all(isinstance(x, (int, float, str)) for x in v))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and all(isinstance(x, float) for x in value):
        return "[" + ", ".join(f"{x:.3g}" for x in value) + "]"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
