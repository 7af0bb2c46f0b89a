"""Self-contained HTML pages: inline CSS, figures embedded as ``data:`` URIs, the data embedded as JSON.

A page is built from parts (cards, sections, tables, figures) that each return
an HTML string; :func:`page` wraps them. Nothing here fetches anything, so a
page opens with no network.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f5f6f8;color:#1d232b}
main{max-width:1120px;margin:0 auto;padding:28px 32px 48px}
h1{font-size:28px;margin:0 0 4px}h2{font-size:20px;margin:0 0 10px;border-bottom:2px solid #e3e6ea;padding-bottom:6px}
.sub{color:#5b6572;margin:0 0 22px}
.cards{display:grid;grid-template-columns:repeat(3,1fr);gap:12px;margin-bottom:26px}
.card{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
.card .v{font-size:26px;font-weight:650;color:#17437a}.card .l{font-size:13px;color:#3d4754;margin-top:2px}
.card .d{font-size:12px;color:#7a8490;margin-top:4px}
section{background:#fff;border-radius:10px;padding:18px 22px;margin-bottom:18px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
section p{line-height:1.5;margin:6px 0 10px}
table{border-collapse:collapse;font-size:14px;margin:8px 0 6px}
th,td{padding:5px 12px;border-bottom:1px solid #e7e9ec;text-align:right}th{background:#f0f2f5;font-weight:600}
th:first-child,td:first-child{text-align:left}
.kv th{background:none;font-weight:500;color:#3d4754}.kv td{text-align:left}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #e7e9ec;border-radius:6px}
figcaption{font-size:13px;color:#5b6572;margin-top:4px}
.ok{color:#1d7a3a;font-weight:600}.bad{color:#b3261e;font-weight:600}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:12px 28px;align-items:start}
code{background:#f0f2f5;padding:1px 5px;border-radius:4px;font-size:13px}
footer{color:#7a8490;font-size:12px;margin-top:20px}
"""


def escape(x: Any) -> str:
    return html.escape(str(x))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A table with a header row; every cell is escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def kv(rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column key/value table."""
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def figure(root: Path, plot: Mapping[str, str]) -> str:
    """``plot`` = {"file": path relative to ``root``, "caption": text}: the PNG embedded as a data URI."""
    raw = (root / plot["file"]).read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(raw).decode("ascii")
    return (f'<figure data-file="{escape(plot["file"])}"><img alt="{escape(plot["caption"])}" src="{uri}">'
            f"<figcaption>{escape(plot['caption'])}</figcaption></figure>")


def cards(headline: Sequence[Mapping[str, str]]) -> str:
    """Summary cards, one per {"key", "text", "label", "detail"}."""
    items = [
        f'<div class="card" data-key="{escape(h["key"])}"><div class="v">{escape(h["text"])}</div>'
        f'<div class="l">{escape(h["label"])}</div><div class="d">{escape(h.get("detail", ""))}</div></div>'
        for h in headline
    ]
    return f'<div class="cards">{"".join(items)}</div>'


def section(title: str, anchor: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def grid2(*parts: str) -> str:
    """Parts side by side in two columns."""
    return '<div class="grid2">' + "".join(parts) + "</div>"


def page(*, title: str, heading: str, subtitle: str, body: Sequence[str], footer: str,
         data: Any, data_id: str) -> str:
    """The whole document. ``subtitle`` and ``footer`` are plain text; ``body`` parts are HTML.
    ``data`` is embedded as JSON in ``<script type="application/json" id=data_id>``."""
    embedded = json.dumps(data, sort_keys=True).replace("</", "<\\/")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{escape(heading)}</h1><p class=\"sub\">{escape(subtitle)}</p>"
        + "".join(body)
        + f"<footer>{escape(footer)}</footer>"
        + f'<script type="application/json" id="{escape(data_id)}">{embedded}</script></main></body></html>\n'
    )
