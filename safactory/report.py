"""A self-contained HTML report of one run directory: `run_dir/report.html`.

Everything is inline: the CSS, and the charts, which are SVG drawn by the small
plotting code below (no JavaScript, no network, no plotting library). The report
reads `metrics.jsonl`, `summary.json` and `config.yaml`, and copes with runs that
stopped early: a missing summary, an empty log or a truncated last line only shrink
the report and are named in it.

metrics.jsonl rows are snapshots that carry old values forward, so each series is
sampled only where it is new: held-out (eval/*) values where an evaluation happened
(`eval/phase` or an eval value changed), train/* and rollout/* values where
`train/step` moved.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safactory.metrics import as_number, read_rows

REPORT_NAME = "report.html"
RATES = ("success_rate", "unsafe_rate", "benign_success_rate")
_ENV_KEY = re.compile(r"^eval/(?P<env>.+)/(?P<metric>success_rate|unsafe_rate|benign_success_rate)$")
_PALETTE = (
    "#1f6fb4",
    "#e0701b",
    "#2b9a3e",
    "#c8312f",
    "#7b55b0",
    "#8a5a4b",
    "#d257a8",
    "#6f6f6f",
    "#a8a626",
    "#1aa9b8",
)
_MAX_POINTS = 800  # a series longer than this is thinned evenly before drawing


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


# ---- choosing the rows where a series has a new value ----------------------------------------
def _finite(value: Any) -> float | None:
    number = as_number(value)
    return number if number is not None and math.isfinite(number) and not isinstance(value, bool) else None


def eval_rows(rows: list[dict[str, Any]]) -> list[int]:
    """Indices of rows that carry a new held-out evaluation."""
    out: list[int] = []
    previous: dict[str, Any] = {}
    for i, row in enumerate(rows):
        phase = row.get("eval/phase")
        new_phase = phase is not None and phase != previous.get("eval/phase")
        new_value = any(
            key.startswith("eval/")
            and key != "eval/phase"
            and _finite(value) is not None
            and value != previous.get(key)
            for key, value in row.items()
        )
        if new_phase or new_value:
            out.append(i)
        previous = row
    return out


def evals_by_learner(rows: list[dict[str, Any]], indices: list[int]) -> dict[str, list[int]]:
    """Evaluation rows split by model: a label such as "student:final" belongs to "student",
    a plain label ("rl@40") to the policy being trained (key "")."""
    groups: dict[str, list[int]] = {}
    for i in indices:
        label = str(rows[i].get("eval/phase") or "")
        learner = label.split(":", 1)[0] if ":" in label else ""
        groups.setdefault(learner, []).append(i)
    return groups


def changed_rows(rows: list[dict[str, Any]], key: str) -> list[int]:
    """Indices of rows where `key` holds a value different from the row before."""
    out: list[int] = []
    previous: Any = None
    for i, row in enumerate(rows):
        value = row.get(key)
        if value is not None and (not out or value != previous):
            out.append(i)
        previous = value
    return out


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str = ""


@dataclass(frozen=True)
class Series:
    name: str
    points: tuple[Point, ...]
    color: str
    width: float = 2.0
    dashed: bool = False
    steps: bool = False  # draw as a staircase (a value that holds until the next one)


def _points(rows: list[dict[str, Any]], indices: Iterable[int], key: str, label_key: str | None = None) -> list[Point]:
    points: list[Point] = []
    for i in indices:
        row = rows[i]
        x, y = _finite(row.get("time_s")), _finite(row.get(key))
        if x is None or y is None:
            continue
        label = str(row.get(label_key) or "") if label_key else ""
        points.append(Point(x, y, label))
    return points


def _thin(points: list[Point], limit: int = _MAX_POINTS) -> tuple[Point, ...]:
    if len(points) <= limit:
        return tuple(points)
    stride = math.ceil(len(points) / limit)
    kept = points[::stride]
    if kept[-1] is not points[-1]:
        kept.append(points[-1])
    return tuple(kept)


# ---- SVG charts -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chart:
    title: str
    y_label: str
    series: tuple[Series, ...]
    y_range: tuple[float, float] | None = None  # fixed range (rates); None: fit to the data
    include_zero: bool = False


_W, _H = 760, 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 62, 18, 22, 46


def _nice_step(span: float, target: int, integer: bool = False) -> float:
    """A round tick spacing (1, 2, 2.5 or 5 times a power of ten) giving about `target` ticks."""
    raw = span / max(target, 1)
    if integer and raw <= 1:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0) if integer else (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= m * magnitude * (1 + 1e-9):
            return m * magnitude
    return 10 * magnitude


def _ticks(lo: float, hi: float, step: float) -> list[float]:
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [round(k * step, 10) for k in range(first, last + 1)]


def _y_axis(chart: Chart, values: list[float]) -> tuple[float, float, list[float]]:
    if chart.y_range is not None:
        lo, hi = chart.y_range
        lo, hi = min([lo, *values]), max([hi, *values])
    else:
        lo, hi = min(values), max(values)
        if chart.include_zero:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, 5, integer=all(float(v).is_integer() for v in values))
    if chart.y_range is None:
        lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return lo, hi, _ticks(lo, hi, step)


_TIME_STEPS = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def _x_axis(values: list[float]) -> tuple[float, float, list[float]]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 1.0, hi + 1.0
    span = hi - lo
    if span < 10:
        step = _nice_step(span, 6)
    else:
        step = next((s for s in _TIME_STEPS if span / s <= 7), 0.0) or _nice_step(span / 86400, 6) * 86400
    return lo, hi, _ticks(lo, hi, step)


def fmt_duration(seconds: float) -> str:
    """Seconds as a short clock label: 45s, 2m30s, 1h05m."""
    if abs(seconds) < 60 and seconds != int(seconds):
        return f"{seconds:.3g}s"
    total = int(round(seconds))
    sign, total = ("-" if total < 0 else ""), abs(total)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{hours}h{minutes:02d}m" if minutes else f"{sign}{hours}h"
    if minutes:
        return f"{sign}{minutes}m{secs:02d}s" if secs else f"{sign}{minutes}m"
    return f"{sign}{secs}s"


def fmt_number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.3g}"
    if value == int(value):
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def render_chart(
    chart: Chart, markers: list[tuple[float, str]] | None = None, x_span: tuple[float, float] | None = None
) -> str:
    """One chart as an inline <svg> plus its legend.

    `markers` are labelled vertical lines (phase starts); `x_span` widens the time axis so
    that all charts of a report share it.
    """
    series = [s for s in chart.series if s.points]
    xs = [p.x for s in series for p in s.points] + list(x_span or ())
    ys = [p.y for s in series for p in s.points]
    x0, x1, x_ticks = _x_axis(xs)
    y0, y1, y_ticks = _y_axis(chart, ys)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return _TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{_e(chart.title)}</title>',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" class="plot"/>',
    ]
    for t in y_ticks:
        y = py(t)
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{_e(fmt_number(t))}</text>')
    for t in x_ticks:
        x = px(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{_TOP + plot_h}" class="grid"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{_TOP + plot_h + 16}" class="tick" text-anchor="middle">{_e(fmt_duration(t))}</text>'
        )
    for at, label in markers or []:
        if x0 <= at <= x1:
            x = px(at)
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{_TOP + plot_h}" class="marker"/>')
            parts.append(f'<text x="{x + 3:.1f}" y="{_TOP - 6}" class="marker-label">{_e(label)}</text>')
    parts.append(
        f'<text x="{_LEFT + plot_w / 2:.1f}" y="{_H - 8}" class="axis-label" text-anchor="middle">'
        "time since start</text>"
    )
    parts.append(
        f'<text transform="translate(14 {_TOP + plot_h / 2:.1f}) rotate(-90)" class="axis-label" '
        f'text-anchor="middle">{_e(chart.y_label)}</text>'
    )
    for s in series:
        coords: list[str] = []
        for i, p in enumerate(s.points):
            if s.steps and i:
                coords.append(f"{px(p.x):.1f},{py(s.points[i - 1].y):.1f}")
            coords.append(f"{px(p.x):.1f},{py(p.y):.1f}")
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        parts.append(
            f'<polyline points="{" ".join(coords)}" fill="none" stroke="{s.color}" '
            f'stroke-width="{s.width}"{dash} stroke-linejoin="round"/>'
        )
        if len(s.points) <= 60:
            for p in s.points:
                tip = f"{s.name} at {fmt_duration(p.x)}: {fmt_number(p.y)}" + (f" ({p.label})" if p.label else "")
                parts.append(
                    f'<circle cx="{px(p.x):.1f}" cy="{py(p.y):.1f}" r="3" fill="{s.color}">'
                    f"<title>{_e(tip)}</title></circle>"
                )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><span class="swatch{" dashed" if s.dashed else ""}" '
        f'style="border-color:{s.color}"></span>{_e(s.name)}</span>'
        for s in series
    )
    return (
        f'<figure class="figure"><figcaption>{_e(chart.title)}</figcaption>{"".join(parts)}'
        f'<div class="legend">{legend}</div></figure>'
    )


# ---- which charts the data supports -----------------------------------------------------------
def env_ids(rows: list[dict[str, Any]]) -> list[str]:
    found = {m.group("env") for row in rows for key in row if (m := _ENV_KEY.match(key))}
    return sorted(found)


def build_charts(rows: list[dict[str, Any]]) -> list[Chart]:
    """The charts the rows have data for, in reading order."""
    evals = eval_rows(rows)
    trained = changed_rows(rows, "train/step")
    envs = env_ids(rows)
    env_color = {env: _PALETTE[(i + 1) % len(_PALETTE)] for i, env in enumerate(envs)}

    def per_step(key: str) -> list[Point]:
        return _points(rows, trained if trained else changed_rows(rows, key), key)

    def heldout(metric: str, title: str) -> Chart:
        series: list[Series] = []
        for learner, indices in evals_by_learner(rows, evals).items():
            prefix, dashed = (f"{learner}: ", True) if learner else ("", False)
            overall = _thin(_points(rows, indices, f"eval/{metric}", "eval/phase"))
            series.append(Series(prefix + ("all envs" if envs else "held-out"), overall, _PALETTE[0], 2.6, dashed))
            for env in envs:
                points = _thin(_points(rows, indices, f"eval/{env}/{metric}", "eval/phase"))
                series.append(Series(prefix + env, points, env_color[env], 1.6, dashed))
        return Chart(title, metric.replace("_", " "), tuple(series), (0.0, 1.0))

    def simple(title: str, y_label: str, keys: list[tuple[str, str]], **kw: Any) -> Chart:
        series = tuple(Series(name, _thin(per_step(key)), _PALETTE[i]) for i, (key, name) in enumerate(keys))
        return Chart(title, y_label, series, **kw)

    version_points = _points(rows, changed_rows(rows, "policy_version"), "policy_version")
    last = _points(rows, [len(rows) - 1], "policy_version") if rows else []
    if version_points and last and last[0].x > version_points[-1].x:
        version_points.append(last[0])
    gap_mean, gap_max = per_step("rollout/version_gap_mean"), per_step("rollout/version_gap_max")

    charts = [
        heldout("success_rate", "Held-out success rate"),
        heldout("unsafe_rate", "Held-out unsafe rate"),
        heldout("benign_success_rate", "Held-out benign success rate"),
        simple(
            "Rollout success and unsafe rates",
            "rate",
            [("rollout/success_rate", "success rate"), ("rollout/unsafe_rate", "unsafe rate")],
            y_range=(0.0, 1.0),
        ),
        simple("Mean rollout reward", "reward", [("rollout/mean_reward", "mean reward")]),
        simple("Training loss", "loss", [("train/loss", "loss")]),
        Chart(
            "Policy version",
            "version",
            (Series("policy version", _thin(version_points), _PALETTE[0], steps=True),),
            include_zero=True,
        ),
        Chart(
            "Staleness (policy versions between generation and training)",
            "version gap",
            (
                Series("mean gap", _thin(gap_mean), _PALETTE[0]),
                Series("max gap", _thin(gap_max), _PALETTE[3], dashed=True),
            ),
            include_zero=True,
        ),
        simple("Throughput", "episodes / s", [("rollout/episodes_per_s", "episodes per second")], include_zero=True),
        simple(
            "Idle fractions",
            "fraction of time idle",
            [("train/idle_fraction", "trainer"), ("rollout/idle_fraction", "rollout workers")],
            y_range=(0.0, 1.0),
        ),
    ]
    return [c for c in charts if any(s.points for s in c.series)]


def phase_starts(rows: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """(time, phase) where the `phase` column takes a new value."""
    starts = []
    for i in changed_rows(rows, "phase"):
        x = _finite(rows[i].get("time_s"))
        if x is not None:
            starts.append((x, str(rows[i]["phase"])))
    return starts


# ---- tables -----------------------------------------------------------------------------------
def fmt_cell(value: Any) -> str:
    """A table cell's text (not yet escaped)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) and 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _table(headers: list[str], body: list[list[str]], css: str = "") -> str:
    """`body` cells are HTML already; headers are plain text."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in body)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _delta(before: Any, after: Any, higher_is_better: bool) -> str:
    a, b = _finite(before), _finite(after)
    if a is None or b is None:
        return '<span class="muted">—</span>'
    d = b - a
    good = d > 1e-12 if higher_is_better else d < -1e-12
    bad = d < -1e-12 if higher_is_better else d > 1e-12
    css = "good" if good else "bad" if bad else "muted"
    return f'<span class="{css}">{_e(f"{d:+.3f}")}</span>'


def _metrics_block(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _gate_decision(rows: list[dict[str, Any]], i: int, until: int) -> bool | None:
    """The gate's decision on the evaluation in row `i` (None: it was not gated).

    The Factory logs `{"gate/accepted", "gate/candidate_version"}` right after each gated
    evaluation (rl@N, rl, student:final), the candidate being the evaluated version. Rows
    carry old values forward, so a decision is a row before the next evaluation (`until`)
    that names this version and is new: the row right after the evaluation, or one whose
    gate values differ from those the evaluation row carried.
    """
    version = rows[i].get("policy_version")
    if version is None:
        return None
    carried = (rows[i].get("gate/candidate_version"), rows[i].get("gate/accepted"))
    for j in range(i + 1, until):
        accepted = rows[j].get("gate/accepted")
        if rows[j].get("gate/candidate_version") != version or not isinstance(accepted, bool):
            continue
        if j == i + 1 or (version, accepted) != carried:
            return accepted
    return None


def heldout_from_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A warm-start/final pair rebuilt from the log's evaluation rows (for runs without a summary).

    As the Factory's summary has them: the warm start is the `sft` evaluation (else `init`,
    else the first one); the final is the last evaluation that the gate accepted, i.e. the
    version deployed at the end (the warm start when the gate accepted none). A log without
    gate decisions (RL off, or stopped before its first gate) falls back to the latest
    evaluation.
    """
    every = eval_rows(rows)
    points = evals_by_learner(rows, every).get("", [])
    points = [i for i in points if any(_finite(rows[i].get(f"eval/{m}")) is not None for m in RATES)]
    if not points:
        return {}
    by_label = {rows[i].get("eval/phase"): i for i in points}  # the last evaluation of each label
    warm = by_label.get("sft", by_label.get("init", points[0]))
    decisions = {}
    for i in points:
        until = next((k for k in every if k > i), len(rows))
        decision = _gate_decision(rows, i, until)
        if decision is not None:
            decisions[i] = decision
    if decisions:
        final = max((i for i, accepted in decisions.items() if accepted), default=warm)
    else:
        final = points[-1]
    envs = env_ids(rows)

    def block(i: int) -> dict[str, Any]:
        row = rows[i]
        return {
            **{m: row.get(f"eval/{m}") for m in RATES},
            "policy_version": row.get("policy_version"),
            "label": row.get("eval/phase"),
            "envs": {env: {m: row.get(f"eval/{env}/{m}") for m in RATES} for env in envs},
        }

    out = {"warm_start": block(warm)}
    if final != warm or decisions:  # gated but nothing accepted: the warm start is what stayed deployed
        out["final"] = block(final)
    return out


def heldout_table(heldout: dict[str, Any]) -> str:
    warm, final = _metrics_block(heldout.get("warm_start")), _metrics_block(heldout.get("final"))
    envs = sorted(set(_metrics_block(warm.get("envs"))) | set(_metrics_block(final.get("envs"))), key=str)
    headers = [
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

    def line(name: str, w: dict[str, Any], f: dict[str, Any]) -> list[str]:
        cells = [_e(name)]
        for metric, higher_is_better in (("success_rate", True), ("unsafe_rate", False), ("benign_success_rate", True)):
            cells += [
                _e(fmt_cell(w.get(metric))),
                _e(fmt_cell(f.get(metric))),
                _delta(w.get(metric), f.get(metric), higher_is_better),
            ]
        return cells

    body = [line("all envs", warm, final)]
    for env in envs:
        body.append(
            line(
                str(env),
                _metrics_block(_metrics_block(warm.get("envs")).get(env)),
                _metrics_block(_metrics_block(final.get("envs")).get(env)),
            )
        )
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
    return _table(headers, body, "numbers") + f'<p class="muted">{_e("; ".join(notes))}.</p>'


def evals_table_from_rows(rows: list[dict[str, Any]]) -> str:
    body = []
    for i in eval_rows(rows):
        row = rows[i]
        body.append(
            [
                _e(fmt_cell(row.get("eval/phase"))),
                _e(fmt_duration(t) if (t := _finite(row.get("time_s"))) is not None else "—"),
                _e(fmt_cell(row.get("policy_version"))),
                *(_e(fmt_cell(row.get(f"eval/{m}"))) for m in RATES),
            ]
        )
    headers = ["evaluation", "time", "policy version", "success", "unsafe", "benign success"]
    return _table(headers, body, "numbers") if body else ""


def evals_table_from_summary(evals: dict[str, Any]) -> str:
    body = []
    for label, block in evals.items():
        m = _metrics_block(block)
        body.append(
            [
                _e(label),
                _e(fmt_cell(m.get("policy_version"))),
                _e(fmt_cell(m.get("episodes"))),
                *(_e(fmt_cell(m.get(r))) for r in RATES),
            ]
        )
    headers = ["evaluation", "policy version", "episodes", "success", "unsafe", "benign success"]
    return _table(headers, body, "numbers") if body else ""


def gate_table(decisions: list[Any]) -> str:
    body = []
    for d in decisions:
        d = _metrics_block(d)
        accepted = d.get("accepted")
        verdict = (
            '<span class="good">accepted</span>'
            if accepted is True
            else '<span class="bad">rejected</span>'
            if accepted is False
            else _e(fmt_cell(accepted))
        )
        reasons = d.get("reasons")
        if isinstance(reasons, list | tuple):
            reasons_html = "<br>".join(_e(fmt_cell(r)) for r in reasons) or '<span class="muted">—</span>'
        else:
            reasons_html = _e(fmt_cell(reasons))
        metrics = d.get("metrics")
        if isinstance(metrics, dict):
            metrics_html = "<br>".join(f"{_e(k)} = {_e(fmt_cell(v))}" for k, v in metrics.items())
        else:
            metrics_html = _e(fmt_cell(metrics))
        body.append(
            [
                _e(fmt_cell(d.get("step"))),
                _e(fmt_cell(d.get("candidate_version"))),
                _e(fmt_cell(d.get("baseline_version"))),
                verdict,
                reasons_html,
                metrics_html or '<span class="muted">—</span>',
            ]
        )
    headers = ["step", "candidate version", "baseline version", "decision", "reasons", "metrics"]
    return _table(headers, body)


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
    end = _finite(rows[-1].get("time_s")) if rows else None
    body = []
    for k, (at, name) in enumerate(starts):
        until = starts[k + 1][0] if k + 1 < len(starts) else end
        body.append([_e(name), _e(fmt_duration(at)), _e(fmt_duration(until - at) if until is not None else "—")])
    return _table(["phase", "started", "duration"], body, "numbers") if body else ""


def generic(value: Any) -> str:
    """Any JSON value as a readable table (dict of dicts, dict of values, list of dicts) or text."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        columns: list[str] = []
        for v in value.values():
            columns += [str(k) for k in v if str(k) not in columns]
        body = [[_e(name), *(_e(fmt_cell(v.get(c))) for c in columns)] for name, v in value.items()]
        return _table(["", *columns], body, "numbers")
    if isinstance(value, dict) and value:
        return _table(["key", "value"], [[_e(k), _e(fmt_cell(v))] for k, v in value.items()], "numbers")
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        columns = []
        for v in value:
            columns += [str(k) for k in v if str(k) not in columns]
        return _table(columns, [[_e(fmt_cell(v.get(c))) for c in columns] for v in value], "numbers")
    return f"<pre>{_e(json.dumps(value, indent=2, default=str))}</pre>"


# ---- the page ---------------------------------------------------------------------------------
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


def _section(title: str, build: Callable[[], str]) -> str:
    """A section whose content cannot take the whole report down with it."""
    try:
        content = build()
    except Exception as exc:  # an unexpected shape in one file should cost one section, not the report
        content = f'<p class="bad">This section could not be drawn: {_e(type(exc).__name__)}: {_e(exc)}</p>'
    return f"<section><h2>{_e(title)}</h2>{content}</section>"


def _missing(text: str) -> str:
    return f'<p class="muted">{_e(text)}</p>'


def render_report(run: RunFiles) -> str:
    rows, summary = run.rows, run.summary
    last = rows[-1] if rows else {}
    run_id = summary.get("run_id") or run.run_dir.name
    facts = [
        ("run directory", str(run.run_dir)),
        ("rows logged", str(len(rows))),
        ("last phase", fmt_cell(last.get("phase"))),
        ("elapsed", fmt_duration(t) if (t := _finite(last.get("time_s"))) is not None else "—"),
        ("policy version", fmt_cell(last.get("policy_version"))),
        ("train steps", fmt_cell(last.get("train/step"))),
        ("rollout episodes", fmt_cell(last.get("rollout/episodes"))),
        ("report written", time.strftime("%Y-%m-%d %H:%M:%S")),
    ]
    meta = " · ".join(f"{_e(k)} <b>{_e(v)}</b>" for k, v in facts)
    notes = "".join(f"<li>{_e(n)}</li>" for n in run.notes)

    def charts() -> str:
        built = build_charts(rows)
        if not built:
            return _missing("No chartable metrics yet.")
        markers = phase_starts(rows)
        times = [t for row in rows if (t := _finite(row.get("time_s"))) is not None]
        span = (min(times), max(times)) if times else None
        return '<div class="charts">' + "".join(render_chart(c, markers, span) for c in built) + "</div>"

    def heldout() -> str:
        block = _metrics_block(summary.get("heldout"))
        if block:
            return heldout_table(block)
        rebuilt = heldout_from_rows(rows)
        if rebuilt:
            source = "summary.json has no held-out results; rebuilt from the evaluations in metrics.jsonl."
            return _missing(source) + heldout_table(rebuilt)
        return _missing("No held-out evaluation recorded.")

    def evaluations() -> str:
        table = evals_table_from_rows(rows)
        if table:
            return table
        table = evals_table_from_summary(_metrics_block(summary.get("evals")))
        return table or _missing("No held-out evaluation recorded.")

    def gate() -> str:
        decisions = summary.get("gate")
        if isinstance(decisions, list) and decisions:
            return gate_table(decisions)
        from_rows = gate_from_rows(rows)
        if from_rows:
            return _missing("From metrics.jsonl (summary.json has no gate decisions): no reasons or metrics.") + (
                gate_table(from_rows)
            )
        return _missing("No gate decisions recorded.")

    def phases() -> str:
        block = summary.get("phases")
        out = generic(block) if block else ""
        timeline = phases_from_rows(rows)
        if timeline:
            out += "<h3>Timeline from metrics.jsonl</h3>" + timeline
        return out or _missing("No phases recorded.")

    def other() -> str:
        rest = {k: v for k, v in summary.items() if k not in ("run_id", "heldout", "evals", "gate", "phases")}
        return "".join(f"<h3>{_e(k)}</h3>{generic(v)}" for k, v in rest.items())

    def config() -> str:
        return (
            f"<pre>{_e(run.config_text)}</pre>" if run.config_text is not None else _missing("config.yaml is missing.")
        )

    sections = [
        _section("Held-out results: warm start vs final", heldout),
        _section("Charts", charts),
        _section("Held-out evaluations", evaluations),
        _section("Gate decisions", gate),
        _section("Phases and timings", phases),
    ]
    if any(k not in ("run_id", "heldout", "evals", "gate", "phases") for k in summary):
        sections.append(_section("Other summary fields", other))
    sections.append(_section("Resolved configuration (config.yaml)", config))
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>Safactory report: {_e(run_id)}</title>'
        f"<style>{_CSS}</style></head><body><main>"
        f'<h1>Safactory run report: {_e(run_id)}</h1><p class="meta">{meta}</p>'
        + (f'<ul class="notes">{notes}</ul>' if notes else "")
        + "".join(sections)
        + "</main></body></html>\n"
    )


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
