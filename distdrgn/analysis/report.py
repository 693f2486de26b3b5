"""A self-contained HTML report: PNG figures embedded as base64, tables of volumes and z.

The report has no external references (no scripts, styles or images fetched), so it can
be copied off a cluster and opened anywhere. Each embedded figure keeps its file name in
``alt`` and ``data-file`` so readers (and tests) can tell which PNG it came from.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure img { max-width: 560px; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; max-width: 560px; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; font-family: monospace; }
th { background: #f3f3f3; } caption { text-align: left; font-weight: bold; padding: 4px 0; }
dl.summary dt { font-weight: bold; float: left; clear: left; width: 14em; }
dl.summary dd { margin-left: 15em; font-family: monospace; }
p.note { color: #555; font-style: italic; }
"""


@dataclass
class Figure:
    """A PNG on disk to embed, with a caption."""

    path: Path
    caption: str = ""


@dataclass
class Table:
    """A table: column names and rows of cells (numbers are formatted, strings escaped)."""

    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Section:
    title: str
    text: str = ""
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _figure_html(fig: Figure) -> str:
    data = base64.b64encode(Path(fig.path).read_bytes()).decode("ascii")
    name = html.escape(Path(fig.path).name)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{name}" data-file="{name}">'
        f"<figcaption>{html.escape(fig.caption)} <code>{name}</code></figcaption></figure>"
    )


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(title: str, summary: dict[str, Any], sections: list[Section]) -> str:
    """The report as one HTML string (figures read from disk and embedded)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<dl class="summary">',
    ]
    for key, value in summary.items():
        parts.append(f"<dt>{html.escape(str(key))}</dt><dd>{_cell(value)}</dd>")
    parts.append("</dl>")
    for sec in sections:
        parts.append(f"<section><h2>{html.escape(sec.title)}</h2>")
        if sec.text:
            parts.append(f'<p class="note">{html.escape(sec.text)}</p>')
        parts.extend(_figure_html(f) for f in sec.figures)
        parts.extend(_table_html(t) for t in sec.tables)
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, title: str, summary: dict[str, Any], sections: list[Section]) -> Path:
    """Write :func:`render_report` to ``path``; returns the path."""
    path = Path(path)
    path.write_text(render_report(title, summary, sections), encoding="utf-8")
    return path
