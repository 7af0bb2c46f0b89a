"""Shared by the page tests: a page is self-contained, its figures are embedded PNGs, and it renders
in headless Chromium (offline) with its plots drawn."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.py"


def screenshot_module():
    spec = importlib.util.spec_from_file_location("screenshot_report", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def images(text: str) -> list[bytes]:
    """Every <img> of the page, decoded; fails on any image that is not an embedded PNG."""
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    out = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:80]
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        out.append(raw)
    return out


def self_contained(text: str) -> None:
    refs = re.findall(r'(?:src|href)="([^"]*)"', text) + re.findall(r"url\(([^)]*)\)", text)
    assert all(r.startswith(("data:", "#")) for r in refs), [r[:60] for r in refs if not r.startswith("data:")]
    assert "<link" not in text and "@import" not in text and "<script src" not in text


def embedded(text: str, data_id: str = "surgeon-data") -> dict:
    match = re.search(rf'<script type="application/json" id="{data_id}">(.*?)</script>', text, re.S)
    return json.loads(match.group(1).replace("<\\/", "</"))


def _pixels(png: Path) -> tuple[int, int]:
    """(distinct colours, saturated pixels): text and page chrome are grey, the plots are coloured."""
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        data = list(rgb.get_flattened_data() if hasattr(rgb, "get_flattened_data") else rgb.getdata())
    return len(set(data)), sum(1 for r, g, b in data if max(r, g, b) - min(r, g, b) > 60)


def rendered(page: Path, tmp_path: Path) -> None:
    shot = screenshot_module()
    if shot.find_browser() is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium): the page was checked, not rendered")
    png = shot.screenshot(page, tmp_path / "page.png", width=1280, height=3000)
    stripped = tmp_path / "stripped.html"
    stripped.write_text(re.sub(r'<img[^>]*>', "", page.read_text(encoding="utf-8")), encoding="utf-8")
    bare = shot.screenshot(stripped, tmp_path / "stripped.png", width=1280, height=3000)
    (colours, coloured), (bare_colours, bare_coloured) = _pixels(png), _pixels(bare)
    assert bare_colours > 20 and colours > 20, "the page rendered blank"
    assert coloured > 5 * max(bare_coloured, 1), (coloured, bare_coloured)  # the embedded plots were drawn
