"""Where and as whom surgeon talks to the Hugging Face Hub: repo ids, the endpoint, the cache, offline
mode and the token, all read when a call is made (not at import): ``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE``; ``--token`` and ``--revision`` (see
:func:`set_hub_defaults`) override the token and the default revision. The token is never put into a
message (:func:`redact`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HUB_ARG = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<rev>[^\s@]+))?")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9_]{8,}")


@dataclass
class _Defaults:
    token: str | None = None
    revision: str | None = None


_defaults = _Defaults()


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


def default_revision() -> str | None:
    """The ``--revision`` set by :func:`set_hub_defaults`, if any."""
    return _defaults.revision
