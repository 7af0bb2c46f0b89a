"""Talking to the Hub when it does not answer well: retries with backoff (408/429/5xx and network
errors, honouring ``Retry-After``) and the one-line :class:`~surgeon.errors.HubError` that says what
failed and how to fix it, for downloads (:mod:`surgeon.io.hub`) and uploads (``surgeon push``) alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from surgeon.errors import HubError
from surgeon.io.hub_settings import cache_dir, endpoint, offline, redact

T = TypeVar("T")
logger = logging.getLogger("surgeon.hub")

RETRY_STATUS = (408, 429, 500, 502, 503, 504)
RETRY_ATTEMPTS = 4
RETRY_BASE_SECONDS = 1.0  # then 2, 4, ... unless the server sends Retry-After
RETRY_MAX_SECONDS = 60.0


def http_status(exc: BaseException) -> int | None:
    """The HTTP status behind ``exc`` (looking through wrapped causes), if any."""
    for err in chain(exc):
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
               and type(e).__name__ != "ProxyError" for e in chain(exc))


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it (causes and contexts), each once."""
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
    for err in chain(exc):
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
        kind = next(type(e).__name__ for e in chain(exc) if type(e).__module__.startswith("httpx"))
        return (f"{where}: cannot reach the Hub at {ep} to {action} ({kind}) after {RETRY_ATTEMPTS} attempts; "
                "check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached files.")
    return f"{where}: could not {action} ({type(exc).__name__}: {_first_line(exc)})."


def _describe_cache_miss(exc: BaseException, where: str, ep: str, action: str) -> str:
    if offline():
        return (f"{where}: not in the local Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE=1 forbids "
                "downloading; run once online (unset HF_HUB_OFFLINE) or pass a local folder.")
    cause = next((e for e in list(chain(exc))[1:] if http_status(e) or is_network_error(e)), None)
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
    for err in chain(exc):
        server = getattr(err, "server_message", None)
        if server:
            return _first_line(server)
    return _first_line(exc)


def _first_line(exc: object) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
