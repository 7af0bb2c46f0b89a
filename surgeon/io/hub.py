"""Hub downloads: a repo at a revision, resolved to a commit and fetched safetensors-only.

A Hub argument is ``org/name`` or ``org/name@revision`` (branch, tag, commit or
``refs/pr/N``). Downloads go through ``huggingface_hub.snapshot_download`` into
the standard HF cache and fetch only what surgeon reads: the shards the index
names (or the top-level ``*.safetensors``), JSON configs, tokenizer files and
the model card. Pickle weights are never fetched. What was fetched from where is
remembered (this process) for provenance and cards.

Settings (endpoint, cache, token, offline) are in :mod:`surgeon.io.hub_settings`, retries and
one-line errors in :mod:`surgeon.io.hub_errors`; both are re-exported here for callers.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import CheckpointFormatError, CheckpointNotFoundError, PickleRefusedError, SurgeonError
from surgeon.io.checkpoint import PICKLE_SUFFIXES
from surgeon.io.hub_errors import (  # re-exported (__all__)
    RETRY_ATTEMPTS,
    RETRY_BASE_SECONDS,
    RETRY_MAX_SECONDS,
    RETRY_STATUS,
    chain,
    hub_error,
    http_status,
    is_network_error,
    retry_wait,
    with_retries,
)
from surgeon.io.hub_settings import (  # re-exported (__all__)
    api,
    cache_dir,
    default_revision,
    endpoint,
    is_repo_id,
    offline,
    parse_hub_arg,
    redact,
    resolve_token,
    set_hub_defaults,
)
from surgeon.progress import progress_enabled

__all__ = [  # what callers import from here: downloads, and the settings and errors they need
    "NEVER_FETCHED", "RESOLVED", "RETRY_ATTEMPTS", "RETRY_BASE_SECONDS", "RETRY_MAX_SECONDS", "RETRY_STATUS",
    "SIDE_FILE_PATTERNS", "HubRef", "api", "cache_dir", "cached_commit", "cached_file", "chain", "default_revision",
    "download", "endpoint", "hf_progress_bars", "http_status", "hub_error", "is_network_error", "is_repo_id",
    "last_resolved", "offline", "parse_hub_arg", "redact", "resolve_token", "resolved_ref", "retry_wait",
    "set_hub_defaults", "with_retries",
]
_chain = chain  # the old private name
_COMMIT = re.compile(r"[0-9a-f]{40}")

# What a download may fetch, besides the weight shards (top-level files only).
SIDE_FILE_PATTERNS = [
    "*.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "*.tiktoken",
    "vocab.txt", "merges.txt", "*.jinja", "README.md", "LICENSE*",
]
NEVER_FETCHED = [f"*{s}" for s in PICKLE_SUFFIXES]


@dataclass(frozen=True)
class HubRef:
    """A Hub model at a revision, and the commit that revision pointed to."""

    repo_id: str
    revision: str
    commit: str | None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"


# local snapshot folder -> the Hub reference it was fetched from (this process only)
RESOLVED: dict[str, HubRef] = {}


def download(repo_id: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """Fetch what surgeon needs of ``repo_id`` into the HF cache; return the snapshot folder."""
    rev = revision or default_revision() or "main"
    tok = resolve_token(token)
    context = dict(repo_id=repo_id, revision=rev, token=tok, action="download")
    try:
        if offline():
            folder = _snapshot(repo_id, rev, SIDE_FILE_PATTERNS, tok, local_only=True, top_level_only=True)
            shards = _shards_needed(repo_id, folder, None)
        else:
            info = with_retries(lambda: api(tok).model_info(repo_id, revision=rev))
            names = [s.rfilename for s in (info.siblings or [])]
            _refuse_pickle_only(repo_id, rev, names)
            folder = with_retries(lambda: _snapshot(repo_id, rev, SIDE_FILE_PATTERNS, tok, local_only=False,
                                                        top_level_only=True))
            shards = _shards_needed(repo_id, folder, names)
        patterns = [glob.escape(s) for s in shards]
        commit = folder.name
        folder = with_retries(lambda: _snapshot(repo_id, commit, patterns, tok, local_only=offline()))
    except SurgeonError:
        raise
    except Exception as exc:  # huggingface_hub and httpx errors: translate, never leak the token
        raise hub_error(exc, **context) from None
    RESOLVED[str(folder)] = HubRef(repo_id, rev, folder.name if _COMMIT.fullmatch(folder.name) else None)
    return folder


def _snapshot(repo_id: str, revision: str, patterns: list[str], token: str | None, *, local_only: bool,
              top_level_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    with hf_progress_bars():
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir(), endpoint=endpoint(), token=token or False,
            allow_patterns=patterns, ignore_patterns=NEVER_FETCHED + (["*/*"] if top_level_only else []),
            local_files_only=local_only, library_name="surgeon",
        )
    return Path(path)


def _refuse_pickle_only(repo_id: str, rev: str, names: list[str]) -> None:
    top = [n for n in names if "/" not in n]
    if any(n.endswith(".safetensors") for n in top):
        return
    pickles = [n for n in top if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise PickleRefusedError(
            f"{repo_id}@{rev}: the repo holds only pickle weights ({', '.join(pickles[:3])}); surgeon never unpickles "
            f"and downloaded nothing. Use a revision with .safetensors (the Hub's conversion bot often opens one: "
            f"{repo_id}@refs/pr/N), or convert with transformers' save_pretrained(..., safe_serialization=True)."
        )
    raise CheckpointNotFoundError(
        f"{repo_id}@{rev}: no .safetensors weights at the top level of the repo (files: {', '.join(top[:5]) or 'none'}); "
        "give a repo that holds a model or a PEFT adapter in safetensors."
    )


def _shards_needed(repo_id: str, folder: Path, names: list[str] | None) -> list[str]:
    """The weight files to fetch: those the index names, else every top-level ``*.safetensors``."""
    shards: set[str] = set()
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
            shards.update(str(v) for v in weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointFormatError(
                f"{repo_id}: {index.name} is not a valid index (expected JSON with a 'weight_map' object); "
                "ask the author to fix it, or pick another revision."
            ) from None
    if not shards:
        pool = names if names is not None else [p.name for p in folder.iterdir()]
        shards = {n for n in pool if "/" not in n and n.endswith(".safetensors")}
    missing = sorted(s for s in shards if names is not None and s not in names)
    if missing:
        raise CheckpointFormatError(
            f"{repo_id}: the index names shard {missing[0]!r} but the repo has no such file; the upload is incomplete. "
            "Ask the author to fix it, or pick another revision."
        )
    if not shards:
        raise CheckpointNotFoundError(
            f"{repo_id}: the cached snapshot in {folder} holds no .safetensors weights; run once online "
            "(unset HF_HUB_OFFLINE) to fetch them."
        )
    return sorted(shards)


@contextmanager
def hf_progress_bars() -> Iterator[None]:
    """huggingface_hub's own bars follow surgeon's: hidden with -q or when stderr is not a terminal."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if progress_enabled() or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def resolved_ref(path: str | os.PathLike[str]) -> HubRef | None:
    """The Hub repo, revision and commit a path returned by :func:`download` came from (this process)."""
    return RESOLVED.get(str(path))


def last_resolved(repo_id: str) -> HubRef | None:
    """The most recent :func:`download` of ``repo_id`` in this process (its revision and commit), if any."""
    cache = cache_dir().resolve()
    refs = [ref for path, ref in RESOLVED.items()
            if ref.repo_id == repo_id and Path(path).resolve().is_relative_to(cache) and Path(path).is_dir()]
    return refs[-1] if refs else None


def cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit ``revision`` pointed to when it was last fetched into the local cache (no network)."""
    rev = revision or "main"
    if _COMMIT.fullmatch(rev):
        return rev
    ref = cache_dir() / f"models--{repo_id.replace('/', '--')}" / "refs" / rev
    try:
        text = ref.read_text().strip()
    except OSError:
        return None
    return text if _COMMIT.fullmatch(text) else None


def cached_file(repo_id: str, commit: str, filename: str) -> Path | None:
    path = cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit / filename
    return path if path.is_file() else None


