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
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; padding: 0 1.5em;
       max-width: 1500px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure.wide { display: block; margin-right: 0; }
figcaption { font-size: 0.9em; color: #555; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; font-family: monospace; }
th { background: #f3f3f3; } caption { text-align: left; font-weight: bold; padding: 4px 0; }
table.summary th { text-align: left; font-family: inherit; background: none; border: none; padding: 2px 2em 2px 0; }
table.summary td { text-align: left; border: none; padding: 2px 0; word-break: break-all; }
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


WIDE_PX = 1000  # figures at least this wide (loss curves, volume strips) get a row of their own


def png_width(data: bytes) -> int | None:
    """Pixel width from a PNG's IHDR header (None if ``data`` is not a PNG)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big")


def _figure_html(fig: Figure) -> str:
    raw = Path(fig.path).read_bytes()
    data = base64.b64encode(raw).decode("ascii")
    name = html.escape(Path(fig.path).name)
    width = png_width(raw)
    # a wide figure is shown up to its own width (never scaled up), on a row of its own; the
    # caption is limited to the image's width so that it wraps under it, not beside it
    cls = ' class="wide"' if width is not None and width >= WIDE_PX else ""
    style = f' style="max-width: min(100%, {width}px)"' if width else ""
    return (
        f'<figure{cls}{style}><img src="data:image/png;base64,{data}" alt="{name}" data-file="{name}"'
        f'{f" width={width}" if width else ""}>'
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
        # a table, not a floated <dl>: each label and its value share a row whatever their lengths
        '<table class="summary"><tbody>',
    ]
    for key, value in summary.items():
        parts.append(f'<tr><th scope="row">{html.escape(str(key))}</th><td>{_cell(value)}</td></tr>')
    parts.append("</tbody></table>")
    parts.extend(_section_html(sec, "h2") for sec in sections)
    parts.append("</body></html>")
    return "\n".join(parts)


def _section_html(sec: Section, heading: str) -> str:
    parts = [f"<section><{heading}>{html.escape(sec.title)}</{heading}>"]
    if sec.text:
        parts.append(f'<p class="note">{html.escape(sec.text)}</p>')
    parts.extend(_figure_html(f) for f in sec.figures)
    parts.extend(_table_html(t) for t in sec.tables)
    parts.append("</section>")
    return "\n".join(parts)


def add_page(report: str | Path, key: str, title: str, sections: list[Section], source: str | Path) -> Path:
    """Add (or replace) a page of another command's results in an existing report.

    The page is one ``<section id=KEY>`` with ``title`` as its heading, ``sections`` under it
    and a link to ``source`` (that command's own report, relative to this one); running the
    command again replaces its page rather than adding a second. Written to a temporary file
    and moved into place, so a reader never sees half a report.
    """
    import os

    report = Path(report)
    text = report.read_text(encoding="utf-8")
    start, end = f"<!-- page:{key} -->", f"<!-- /page:{key} -->"
    if start in text and end in text:
        text = text[: text.index(start)] + text[text.index(end) + len(end):].lstrip("\n")
    link = os.path.relpath(Path(source).resolve(), report.resolve().parent)
    page = "\n".join([start, f'<section id="{html.escape(key)}"><h2>{html.escape(title)}</h2>',
                      f'<p class="note">The full page: <a href="{html.escape(link)}">{html.escape(link)}</a></p>',
                      *(_section_html(sec, "h3") for sec in sections), "</section>", end])
    closing = "</body></html>"
    text = text[: text.rindex(closing)] + page + "\n" + closing if closing in text else text + page
    tmp = report.with_name(f".{report.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, report)
    return report


def write_report(path: str | Path, title: str, summary: dict[str, Any], sections: list[Section]) -> Path:
    """Write :func:`render_report` to ``path``; returns the path."""
    path = Path(path)
    path.write_text(render_report(title, summary, sections), encoding="utf-8")
    return path
