"""A self-contained HTML report of one run directory: `run_dir/report.html`.

Everything is inline: the CSS, and the charts, which are SVG drawn by the report's own
plotting code (no JavaScript, no network, no plotting library). The report reads
`metrics.jsonl`, `summary.json` and `config.yaml`, and copes with runs that stopped early:
a missing summary, an empty log or a truncated last line only shrink the report and are
named in it.

This file reads the run directory, assembles the page's sections and writes it; the
pieces live beside it: `report_rows` (sampling the metrics rows), `report_charts` and
`report_svg` (the charts), `report_tables` (the tables), `report_html` (the page shell and
CSS) and `report_format` (text of single values).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safactory.factory.metrics import read_rows
from safactory.factory.report_charts import build_charts
from safactory.factory.report_format import esc, fmt_cell, fmt_duration
from safactory.factory.report_html import missing, page, section
from safactory.factory.report_rows import finite, heldout_from_rows, phase_starts
from safactory.factory.report_svg import render_chart
from safactory.factory.report_tables import (
    as_dict,
    evals_table_from_rows,
    evals_table_from_summary,
    gate_from_rows,
    gate_table,
    generic,
    heldout_table,
    phases_from_rows,
)

REPORT_NAME = "report.html"
_SUMMARY_SECTIONS = ("run_id", "heldout", "evals", "gate", "phases")  # summary keys with a section of their own


# ---- loading -------------------------------------------------------------------------------
@dataclass
class RunFiles:
    """What a run directory holds, and what was missing or unreadable in it."""

    run_dir: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    config_text: str | None
    notes: list[str] = field(default_factory=list)


def load_run(run_dir: Path) -> RunFiles:
    """Read what the run directory holds, noting each file that is missing, empty or unreadable."""
    notes: list[str] = []
    metrics_path = run_dir / "metrics.jsonl"
    rows, skipped = read_rows(metrics_path)
    if not metrics_path.is_file():
        notes.append("metrics.jsonl is missing: no charts can be drawn.")
    elif not rows:
        notes.append("metrics.jsonl has no readable rows yet: no charts can be drawn.")
    if skipped:
        notes.append(
            f"{skipped} unreadable line(s) of metrics.jsonl were skipped "
            "(a run stopped in the middle of a write leaves a truncated last line)."
        )
    summary: dict[str, Any] = {}
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        notes.append(
            "summary.json is missing: the run is still going or was stopped before the end. "
            "Tables are rebuilt from metrics.jsonl where possible."
        )
    else:
        try:
            loaded = json.loads(summary_path.read_text(encoding="utf-8", errors="replace"))
        except ValueError as exc:
            notes.append(f"summary.json could not be parsed ({exc}); tables are rebuilt from metrics.jsonl.")
        else:
            if isinstance(loaded, dict):
                summary = loaded
            else:
                notes.append("summary.json does not hold a JSON object; it is ignored.")
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8", errors="replace") if config_path.is_file() else None
    if config_text is None:
        notes.append("config.yaml is missing.")
    return RunFiles(run_dir, rows, summary, config_text, notes)


# ---- the sections -----------------------------------------------------------------------------
def _facts(run: RunFiles) -> list[tuple[str, str]]:
    """The line of facts under the title, from the last row logged."""
    rows = run.rows
    last = rows[-1] if rows else {}
    return [
        ("run directory", str(run.run_dir)),
        ("rows logged", str(len(rows))),
        ("last phase", fmt_cell(last.get("phase"))),
        ("elapsed", fmt_duration(t) if (t := finite(last.get("time_s"))) is not None else "—"),
        ("policy version", fmt_cell(last.get("policy_version"))),
        ("train steps", fmt_cell(last.get("train/step"))),
        ("rollout episodes", fmt_cell(last.get("rollout/episodes"))),
        ("report written", time.strftime("%Y-%m-%d %H:%M:%S")),
    ]


def _charts(rows: list[dict[str, Any]]) -> str:
    built = build_charts(rows)
    if not built:
        return missing("No chartable metrics yet.")
    markers = phase_starts(rows)
    times = [t for row in rows if (t := finite(row.get("time_s"))) is not None]
    span = (min(times), max(times)) if times else None
    return '<div class="charts">' + "".join(render_chart(c, markers, span) for c in built) + "</div>"


def _heldout(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    block = as_dict(summary.get("heldout"))
    if block:
        return heldout_table(block)
    rebuilt = heldout_from_rows(rows)
    if rebuilt:
        source = "summary.json has no held-out results; rebuilt from the evaluations in metrics.jsonl."
        return missing(source) + heldout_table(rebuilt)
    return missing("No held-out evaluation recorded.")


def _evaluations(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    table = evals_table_from_rows(rows)
    if table:
        return table
    table = evals_table_from_summary(as_dict(summary.get("evals")))
    return table or missing("No held-out evaluation recorded.")


def _gate(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    decisions = summary.get("gate")
    if isinstance(decisions, list) and decisions:
        return gate_table(decisions)
    from_rows = gate_from_rows(rows)
    if from_rows:
        return missing("From metrics.jsonl (summary.json has no gate decisions): no reasons or metrics.") + (
            gate_table(from_rows)
        )
    return missing("No gate decisions recorded.")


def _phases(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    block = summary.get("phases")
    out = generic(block) if block else ""
    timeline = phases_from_rows(rows)
    if timeline:
        out += "<h3>Timeline from metrics.jsonl</h3>" + timeline
    return out or missing("No phases recorded.")


def _other(summary: dict[str, Any]) -> str:
    rest = {k: v for k, v in summary.items() if k not in _SUMMARY_SECTIONS}
    return "".join(f"<h3>{esc(k)}</h3>{generic(v)}" for k, v in rest.items())


def _config(config_text: str | None) -> str:
    return f"<pre>{esc(config_text)}</pre>" if config_text is not None else missing("config.yaml is missing.")


# ---- the page ---------------------------------------------------------------------------------
def render_report(run: RunFiles) -> str:
    rows, summary = run.rows, run.summary
    run_id = summary.get("run_id") or run.run_dir.name
    facts = _facts(run)
    sections = [
        section("Held-out results: warm start vs final", lambda: _heldout(rows, summary)),
        section("Charts", lambda: _charts(rows)),
        section("Held-out evaluations", lambda: _evaluations(rows, summary)),
        section("Gate decisions", lambda: _gate(rows, summary)),
        section("Phases and timings", lambda: _phases(rows, summary)),
    ]
    if any(k not in _SUMMARY_SECTIONS for k in summary):
        sections.append(section("Other summary fields", lambda: _other(summary)))
    sections.append(section("Resolved configuration (config.yaml)", lambda: _config(run.config_text)))
    return page(run_id, facts, run.notes, sections)


def write_report(run_dir: Path) -> Path:
    """Build `run_dir/report.html` from what the run directory holds; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir}")
    page = render_report(load_run(run_dir))
    out = run_dir / REPORT_NAME
    tmp = run_dir / f".{REPORT_NAME}.{os.getpid()}.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)  # a reader never sees half a report
    return out
