"""The report's tables: held-out warm start vs final with deltas, the evaluations, the gate decisions, the
phase timeline, and any other JSON value of the summary as a readable table."""

from __future__ import annotations

import json
from typing import Any

from safactory.factory.report_format import esc, fmt_cell, fmt_duration
from safactory.factory.report_html import table
from safactory.factory.report_rows import RATES, changed_rows, eval_rows, finite, phase_starts

_HELDOUT_HEADERS = [
    "env",
    "warm-start success",
    "final success",
    "Δ success",
    "warm-start unsafe",
    "final unsafe",
    "Δ unsafe",
    "warm-start benign success",
    "final benign success",
    "Δ benign success",
]


def as_dict(value: Any) -> dict[str, Any]:
    """`value` when it is a dict, else an empty one (summary fields may hold anything)."""
    return value if isinstance(value, dict) else {}


def _delta(before: Any, after: Any, higher_is_better: bool) -> str:
    a, b = finite(before), finite(after)
    if a is None or b is None:
        return '<span class="muted">—</span>'
    d = b - a
    good = d > 1e-12 if higher_is_better else d < -1e-12
    bad = d < -1e-12 if higher_is_better else d > 1e-12
    css = "good" if good else "bad" if bad else "muted"
    return f'<span class="{css}">{esc(f"{d:+.3f}")}</span>'


def _heldout_line(name: str, w: dict[str, Any], f: dict[str, Any]) -> list[str]:
    """One row of the held-out table: warm start, final and delta for each rate."""
    cells = [esc(name)]
    for metric, higher_is_better in (("success_rate", True), ("unsafe_rate", False), ("benign_success_rate", True)):
        cells += [
            esc(fmt_cell(w.get(metric))),
            esc(fmt_cell(f.get(metric))),
            _delta(w.get(metric), f.get(metric), higher_is_better),
        ]
    return cells


def _heldout_notes(warm: dict[str, Any], final: dict[str, Any]) -> list[str]:
    """Which policy version, how many episodes and which evaluation each side of the table is."""
    notes = []
    for name, block in (("warm start", warm), ("final", final)):
        if not block:
            notes.append(f"no {name} evaluation recorded")
            continue
        bits = [f"policy v{fmt_cell(block.get('policy_version'))}"]
        if block.get("episodes") is not None:
            bits.append(f"{fmt_cell(block.get('episodes'))} episodes")
        if block.get("label"):
            bits.append(f"evaluation {fmt_cell(block.get('label'))}")
        notes.append(f"{name}: " + ", ".join(bits))
    return notes


def heldout_table(heldout: dict[str, Any]) -> str:
    warm, final = as_dict(heldout.get("warm_start")), as_dict(heldout.get("final"))
    envs = sorted(set(as_dict(warm.get("envs"))) | set(as_dict(final.get("envs"))), key=str)
    body = [_heldout_line("all envs", warm, final)]
    for env in envs:
        body.append(
            _heldout_line(
                str(env),
                as_dict(as_dict(warm.get("envs")).get(env)),
                as_dict(as_dict(final.get("envs")).get(env)),
            )
        )
    notes = _heldout_notes(warm, final)
    return table(_HELDOUT_HEADERS, body, "numbers") + f'<p class="muted">{esc("; ".join(notes))}.</p>'


def evals_table_from_rows(rows: list[dict[str, Any]]) -> str:
    body = []
    for i in eval_rows(rows):
        row = rows[i]
        body.append(
            [
                esc(fmt_cell(row.get("eval/phase"))),
                esc(fmt_duration(t) if (t := finite(row.get("time_s"))) is not None else "—"),
                esc(fmt_cell(row.get("policy_version"))),
                *(esc(fmt_cell(row.get(f"eval/{m}"))) for m in RATES),
            ]
        )
    headers = ["evaluation", "time", "policy version", "success", "unsafe", "benign success"]
    return table(headers, body, "numbers") if body else ""


def evals_table_from_summary(evals: dict[str, Any]) -> str:
    body = []
    for label, block in evals.items():
        m = as_dict(block)
        body.append(
            [
                esc(label),
                esc(fmt_cell(m.get("policy_version"))),
                esc(fmt_cell(m.get("episodes"))),
                *(esc(fmt_cell(m.get(r))) for r in RATES),
            ]
        )
    headers = ["evaluation", "policy version", "episodes", "success", "unsafe", "benign success"]
    return table(headers, body, "numbers") if body else ""


def _verdict_cell(accepted: Any) -> str:
    if accepted is True:
        return '<span class="good">accepted</span>'
    if accepted is False:
        return '<span class="bad">rejected</span>'
    return esc(fmt_cell(accepted))


def _reasons_cell(reasons: Any) -> str:
    if isinstance(reasons, list | tuple):
        return "<br>".join(esc(fmt_cell(r)) for r in reasons) or '<span class="muted">—</span>'
    return esc(fmt_cell(reasons))


def _metrics_cell(metrics: Any) -> str:
    if isinstance(metrics, dict):
        metrics_html = "<br>".join(f"{esc(k)} = {esc(fmt_cell(v))}" for k, v in metrics.items())
    else:
        metrics_html = esc(fmt_cell(metrics))
    return metrics_html or '<span class="muted">—</span>'


def gate_table(decisions: list[Any]) -> str:
    body = []
    for d in decisions:
        d = as_dict(d)
        body.append(
            [
                esc(fmt_cell(d.get("step"))),
                esc(fmt_cell(d.get("candidate_version"))),
                esc(fmt_cell(d.get("baseline_version"))),
                _verdict_cell(d.get("accepted")),
                _reasons_cell(d.get("reasons")),
                _metrics_cell(d.get("metrics")),
            ]
        )
    headers = ["step", "candidate version", "baseline version", "decision", "reasons", "metrics"]
    return table(headers, body)


def gate_from_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gate decisions as far as the log shows them (no reasons or metrics there)."""
    indices = sorted(set(changed_rows(rows, "gate/candidate_version")) | set(changed_rows(rows, "gate/accepted")))
    return [
        {
            "step": rows[i].get("train/step"),
            "candidate_version": rows[i].get("gate/candidate_version"),
            "accepted": rows[i].get("gate/accepted"),
        }
        for i in indices
    ]


def phases_from_rows(rows: list[dict[str, Any]]) -> str:
    """A timeline of the `phase` column: when each phase began and how long it ran."""
    starts = phase_starts(rows)
    end = finite(rows[-1].get("time_s")) if rows else None
    body = []
    for k, (at, name) in enumerate(starts):
        until = starts[k + 1][0] if k + 1 < len(starts) else end
        body.append([esc(name), esc(fmt_duration(at)), esc(fmt_duration(until - at) if until is not None else "—")])
    return table(["phase", "started", "duration"], body, "numbers") if body else ""


def generic(value: Any) -> str:
    """Any JSON value as a readable table (dict of dicts, dict of values, list of dicts) or text."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        columns: list[str] = []
        for v in value.values():
            columns += [str(k) for k in v if str(k) not in columns]
        body = [[esc(name), *(esc(fmt_cell(v.get(c))) for c in columns)] for name, v in value.items()]
        return table(["", *columns], body, "numbers")
    if isinstance(value, dict) and value:
        return table(["key", "value"], [[esc(k), esc(fmt_cell(v))] for k, v in value.items()], "numbers")
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        columns = []
        for v in value:
            columns += [str(k) for k in v if str(k) not in columns]
        return table(columns, [[esc(fmt_cell(v.get(c))) for c in columns] for v in value], "numbers")
    return f"<pre>{esc(json.dumps(value, indent=2, default=str))}</pre>"
