"""The report page's HTML building blocks: the inline stylesheet, tables, sections that fail on their own,
muted notes, and the page shell around them."""

from __future__ import annotations

from collections.abc import Callable

from safactory.factory.report_format import esc

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2330;margin:0;background:#f5f6f8}
main{max-width:1600px;margin:0 auto;padding:20px 28px 48px}
h1{font-size:22px;margin:4px 0 2px}
h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #d9dde4;padding-bottom:4px}
.meta{color:#555e6e;margin:0 0 12px}.meta b{color:#1d2330}
.notes{background:#fff6e0;border:1px solid #f0d48a;border-radius:6px;padding:8px 14px;margin:12px 0}
.notes li{margin:2px 0}
.charts{display:flex;flex-wrap:wrap;gap:14px}
.figure{background:#fff;border:1px solid #d9dde4;border-radius:6px;margin:0;padding:10px 12px;max-width:100%}
.figure figcaption{font-weight:600;margin-bottom:4px}
svg.chart{max-width:100%;height:auto;display:block}
.plot{fill:#fff;stroke:#c4c9d2}.grid{stroke:#eceef2;stroke-width:1}
.tick{font-size:11px;fill:#5c6575}.axis-label{font-size:12px;fill:#3d4554}
.marker{stroke:#9aa2b1;stroke-dasharray:3 3}.marker-label{font-size:11px;fill:#6b7383}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;margin-top:4px}
.swatch{display:inline-block;width:18px;border-top:3px solid;margin-right:5px;vertical-align:middle}
.swatch.dashed{border-top-style:dashed}
table{border-collapse:collapse;background:#fff;margin:6px 0;font-size:13px}
th,td{border:1px solid #d9dde4;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600}
table.numbers td{font-variant-numeric:tabular-nums}
.good{color:#17803a;font-weight:600}.bad{color:#b42318;font-weight:600}.muted{color:#7b8494}
pre{background:#fff;border:1px solid #d9dde4;border-radius:6px;padding:10px 12px;overflow:auto;font-size:12px}
"""


def table(headers: list[str], body: list[list[str]], css: str = "") -> str:
    """`body` cells are HTML already; headers are plain text."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in body)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def section(title: str, build: Callable[[], str]) -> str:
    """A section whose content cannot take the whole report down with it."""
    try:
        content = build()
    except Exception as exc:  # an unexpected shape in one file should cost one section, not the report
        content = f'<p class="bad">This section could not be drawn: {esc(type(exc).__name__)}: {esc(exc)}</p>'
    return f"<section><h2>{esc(title)}</h2>{content}</section>"


def missing(text: str) -> str:
    """A muted note standing in for content the run does not have."""
    return f'<p class="muted">{esc(text)}</p>'


def page(run_id: object, facts: list[tuple[str, str]], notes: list[str], sections: list[str]) -> str:
    """The whole document: title, the run's facts line, the notes on what was missing, then the sections."""
    meta = " · ".join(f"{esc(k)} <b>{esc(v)}</b>" for k, v in facts)
    items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>Safactory report: {esc(run_id)}</title>'
        f"<style>{_CSS}</style></head><body><main>"
        f'<h1>Safactory run report: {esc(run_id)}</h1><p class="meta">{meta}</p>'
        + (f'<ul class="notes">{items}</ul>' if items else "")
        + "".join(sections)
        + "</main></body></html>\n"
    )
