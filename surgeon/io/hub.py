"""The Hugging Face Hub: repo ids, safetensors-only downloads, retries, one-line errors.

A Hub argument is ``org/name`` or ``org/name@revision`` (branch, tag, commit or
``refs/pr/N``). Downloads go through ``huggingface_hub.snapshot_download`` into
the standard HF cache and fetch only what surgeon reads: the shards the index
names (or the top-level ``*.safetensors``), JSON configs, tokenizer files and
the model card. Pickle weights are never fetched.

Settings are read when a call is made, not at import: ``HF_ENDPOINT``,
``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE``; ``--token`` and
``--revision`` (see :func:`set_hub_defaults`) override the token and the
default revision. The token is never put into a message.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from surgeon.errors import CheckpointFormatError, CheckpointNotFoundError, HubError, PickleRefusedError, SurgeonError
from surgeon.io.checkpoint import PICKLE_SUFFIXES
from surgeon.progress import progress_enabled

T = TypeVar("T")
logger = logging.getLogger("surgeon.hub")

_HUB_ARG = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<rev>[^\s@]+))?")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9_]{8,}")
_COMMIT = re.compile(r"[0-9a-f]{40}")

# What a download may fetch, besides the weight shards (top-level files only).
SIDE_FILE_PATTERNS = [
    "*.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "*.tiktoken",
    "vocab.txt", "merges.txt", "*.jinja", "README.md", "LICENSE*",
]
NEVER_FETCHED = [f"*{s}" for s in PICKLE_SUFFIXES]

RETRY_STATUS = (408, 429, 500, 502, 503, 504)
RETRY_ATTEMPTS = 4
RETRY_BASE_SECONDS = 1.0  # then 2, 4, ... unless the server sends Retry-After
RETRY_MAX_SECONDS = 60.0


@dataclass
class _Defaults:
    token: str | None = None
    revision: str | None = None


_defaults = _Defaults()
# local snapshot folder -> the Hub reference it was fetched from (this process only)
RESOLVED: dict[str, HubRef] = {}


@dataclass(frozen=True)
class HubRef:
    """A Hub model at a revision, and the commit that revision pointed to."""

    repo_id: str
    revision: str
    commit: str | None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"


def set_hub_defaults(*, token: str | None = None, revision: str | None = None) -> None:
    """Process-wide ``--token`` and default ``--revision`` for Hub arguments (the CLI sets these)."""
    _defaults.token = token or None
    _defaults.revision = revision or None


def parse_hub_arg(text: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; None when ``text`` is not a Hub id."""
    if text.startswith((".", "/", "~")):
        return None
    m = _HUB_ARG.fullmatch(text)
    if m is None or m["repo"].endswith((".", "-")) or ".." in m["repo"]:
        return None
    return m["repo"], m["rev"]


def is_repo_id(text: str) -> bool:
    parsed = parse_hub_arg(text)
    return parsed is not None and parsed[1] is None


# -- settings read at call time ---------------------------------------------------------------

def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    from huggingface_hub import constants

    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    if "HF_HUB_OFFLINE" in os.environ or "TRANSFORMERS_OFFLINE" in os.environ:
        return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE)


def resolve_token(token: str | None = None) -> str | None:
    """``token``, else ``--token``, else ``HF_TOKEN``, else the saved ``hf auth login`` token."""
    if token or _defaults.token:
        return token or _defaults.token
    from huggingface_hub import get_token

    return get_token()


def api(token: str | None = None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=resolve_token(token) or False, library_name="surgeon")


def redact(text: str, token: str | None = None) -> str:
    """``text`` with the token (and anything shaped like an HF token) masked."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


# -- downloads --------------------------------------------------------------------------------

def download(repo_id: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """Fetch what surgeon needs of ``repo_id`` into the HF cache; return the snapshot folder."""
    rev = revision or _defaults.revision or "main"
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


# -- retries and errors -----------------------------------------------------------------------

def http_status(exc: BaseException) -> int | None:
    """The HTTP status behind ``exc`` (looking through wrapped causes), if any."""
    for err in _chain(exc):
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
    return None


def is_network_error(exc: BaseException) -> bool:
    """True when ``exc`` comes from the connection (refused, reset, timed out), not from an answer."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    transport: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        try:
            transport.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return any(isinstance(e, tuple(transport)) and not isinstance(e, OfflineModeIsEnabled)
               and type(e).__name__ != "ProxyError" for e in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        err = todo.pop(0)
        if id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        todo.extend(e for e in (err.__cause__, err.__context__) if e is not None)


def retry_wait(exc: BaseException, attempt: int) -> float | None:
    """Seconds to wait before retrying after ``exc``, or None when retrying cannot help."""
    status = http_status(exc)
    if status is None and not is_network_error(exc):
        return None
    if status is not None and status not in RETRY_STATUS:
        return None
    for err in _chain(exc):
        after = getattr(getattr(err, "response", None), "headers", {}).get("Retry-After")
        if after is not None and str(after).strip().isdigit():
            return min(float(after), RETRY_MAX_SECONDS)
    return min(RETRY_BASE_SECONDS * 2 ** (attempt - 1), RETRY_MAX_SECONDS)


def with_retries(call: Callable[[], T], *, attempts: int = RETRY_ATTEMPTS) -> T:
    """``call()``, retried on 408/429/5xx and network errors with backoff (honouring Retry-After)."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            wait = retry_wait(exc, attempt)
            if wait is None or attempt == attempts:
                raise
            status = http_status(exc)
            logger.warning("Hub answered %s; retrying in %.0fs (attempt %d of %d)",
                           status or "with a network error", wait, attempt + 1, attempts)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def hub_error(exc: BaseException, *, repo_id: str, action: str, revision: str | None = None,
              token: str | None = None) -> HubError:
    """One line that says what failed on the Hub and how to fix it (never containing the token)."""
    return HubError(redact(_describe(exc, repo_id, action, revision), token))


def _describe(exc: BaseException, repo_id: str, action: str, revision: str | None) -> str:
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, LocalTokenNotFoundError, OfflineModeIsEnabled,
        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    where, ep = f"{repo_id}@{revision}" if revision else repo_id, endpoint()
    status = http_status(exc)
    if isinstance(exc, GatedRepoError):
        return (f"{where}: the repo is gated; accept its terms at {ep}/{repo_id} and use a token of that account "
                "(HF_TOKEN or --token).")
    if isinstance(exc, RevisionNotFoundError):
        return f"{where}: revision {revision!r} does not exist in {repo_id}; check the branch, tag or commit."
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"{where}: a file listed by the Hub is missing ({status}); the upload is incomplete, try another revision."
    if isinstance(exc, RepositoryNotFoundError):
        local = "no such local path, and " if action == "download" else ""
        return (f"{where}: {local}no such repo on {ep}, or it is private and the token cannot see it; check the "
                "path or id, or set HF_TOKEN / pass --token with access.")
    if isinstance(exc, LocalTokenNotFoundError):
        return f"{where}: a Hub token is needed to {action}; set HF_TOKEN, pass --token, or run `hf auth login`."
    if isinstance(exc, LocalEntryNotFoundError) or isinstance(exc, OfflineModeIsEnabled):
        return _describe_cache_miss(exc, where, ep, action)
    if status is not None:
        return _describe_status(status, where, action, ep, exc)
    if is_network_error(exc):
        kind = next(type(e).__name__ for e in _chain(exc) if type(e).__module__.startswith("httpx"))
        return (f"{where}: cannot reach the Hub at {ep} to {action} ({kind}) after {RETRY_ATTEMPTS} attempts; "
                "check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached files.")
    return f"{where}: could not {action} ({type(exc).__name__}: {_first_line(exc)})."


def _describe_cache_miss(exc: BaseException, where: str, ep: str, action: str) -> str:
    if offline():
        return (f"{where}: not in the local Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE=1 forbids "
                "downloading; run once online (unset HF_HUB_OFFLINE) or pass a local folder.")
    cause = next((e for e in list(_chain(exc))[1:] if http_status(e) or is_network_error(e)), None)
    if cause is not None:
        return _describe(cause, where.split("@")[0], action, where.partition("@")[2] or None)
    return f"{where}: not found in the local cache and the Hub at {ep} did not answer; check the network and retry."


_STATUS_FIX = {
    401: "the Hub rejected the token (401 Unauthorized); set HF_TOKEN or pass --token with a valid token "
         "(create one at {ep}/settings/tokens).",
    403: "the token is not allowed to do this (403 Forbidden); use a token with write access to this repo or "
         "its organization (fine-grained tokens need 'write' on it).",
    404: "not found (404); check the repo id and revision.",
    409: "conflict (409): the repo name is taken or another operation on it is running; wait and retry, or "
         "choose another repo id.",
    412: "the branch moved while pushing (412 Precondition Failed): someone else committed; nothing was "
         "committed by this push. Re-run surgeon push to push on top of the new head.",
    413: "the Hub refused a request as too large (413 Payload Too Large); large files must go through LFS: check "
         "that huggingface_hub is up to date and that .gitattributes tracks *.safetensors with LFS.",
    429: "rate limited by the Hub (429 Too Many Requests) after {n} attempts; wait a few minutes and re-run.",
}


def _describe_status(status: int, where: str, action: str, ep: str, exc: BaseException) -> str:
    fix = _STATUS_FIX.get(status)
    if fix is None and status >= 500:
        fix = (f"Hub server error ({status}) after {RETRY_ATTEMPTS} attempts; the Hub or HF_ENDPOINT is having "
               "trouble, retry later (https://status.huggingface.co).")
    if fix is None:
        fix = f"the Hub answered {status} ({_server_message(exc)})."
    return f"{where}: cannot {action}: " + fix.format(ep=ep, n=RETRY_ATTEMPTS)


def _server_message(exc: BaseException) -> str:
    for err in _chain(exc):
        server = getattr(err, "server_message", None)
        if server:
            return _first_line(server)
    return _first_line(exc)


def _first_line(exc: object) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
