"""Fixtures for Hub tests: a running FakeHub with the HF environment pointed at it and at tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import READ_TOKEN, WRITE_TOKEN, FakeHub

__all__ = ["READ_TOKEN", "WRITE_TOKEN", "FakeHub", "fake_hub", "go_offline"]


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A running FakeHub with HF_ENDPOINT, HF_HOME and the HF cache pointed at it and at tmp_path.

    huggingface_hub reads some settings at import time, so its constants are
    patched too: any request built from defaults lands on the fake server,
    never on the real network. Xet is disabled; no token is set.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils._http import close_session

    import surgeon.io.hub as surgeon_hub
    from surgeon.io import hub_errors

    hub = FakeHub().start()
    home = tmp_path / "hf_home"
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(hub_errors, "RETRY_BASE_SECONDS", 0.01)
    surgeon_hub.set_hub_defaults()
    yield hub
    hub.stop()
    close_session()
    assert not hub.unhandled, f"requests the fake Hub does not implement: {hub.unhandled}"


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
