"""Screenshot an HTML page (the demo report, an --html page) with headless Chromium, to know it renders.

Usage:
    python scripts/screenshot_report.py surgeon-demo/report.html -o report.png

Needs Debian's ``chromium`` package (``apt-get install -y chromium``) or any
Chromium/Chrome binary on PATH. The browser runs offline, with a throwaway
profile, and can only see the local file: the report must be self-contained.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def find_browser() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(page: Path, png: Path, *, width: int = 1280, height: int = 2400, timeout: float = 120.0) -> Path:
    """Render ``page`` with headless Chromium into ``png`` (width x height pixels); return ``png``.

    Raises RuntimeError when no browser is installed or it produced no PNG.
    """
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no chromium on PATH; install it with: apt-get install -y chromium")
    png = png.resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="surgeon-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}",
               # offline: every http(s) request goes to a closed local port, so a page that needs the
               # network renders without what it fetches (file:// itself is never proxied)
               "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>", f"--screenshot={png}",
               f"--window-size={width},{height}", page.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if not png.is_file() or png.read_bytes()[:8] != PNG_MAGIC:
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="HTML file to render")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: beside the page, .png)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    if not args.page.is_file():
        print(f"error: {args.page}: no such file", file=sys.stderr)
        return 2
    out = args.output or args.page.with_suffix(".png")
    try:
        screenshot(args.page, out, width=args.width, height=args.height)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
