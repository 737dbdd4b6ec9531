"""The curves of the run page: which metrics each chart draws, and the slice of each metrics row the
page needs to draw them.

The page's script (`static/charts.js`) turns rows into points: a series gets a point where its
marker changed (an evaluation's label, a training step), so a value carried along in every
snapshot row is drawn once per event; gate decisions (`gate/candidate_version`, `gate/accepted`)
are marked on the time axis. Rows come in slices from `/api/runs/{run}/metrics?offset=N`, so a
live run's curves grow as its `metrics.jsonl` does.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

TIME_KEY = "time_s"
GATE_KEYS = ("gate/candidate_version", "gate/accepted")
EVAL_MARKER = "eval/phase"
STEP_MARKER = "train/step"


@dataclass(frozen=True)
class SeriesSpec:
    """One line: the metric `key` (or every key matching `pattern`, one line each, named by its group)."""

    label: str
    key: str = ""
    pattern: str = ""
    marker: str = ""  # a new point where this key (or the value itself) changed


@dataclass(frozen=True)
class ChartSpec:
    id: str
    title: str
    series: tuple[SeriesSpec, ...]
    rate: bool = False  # y from 0 to 1


CHARTS = (
    ChartSpec(
        "success",
        "Success rate",
        (
            SeriesSpec("held-out", "eval/success_rate", marker=EVAL_MARKER),
            SeriesSpec("rollout", "rollout/success_rate", marker=STEP_MARKER),
        ),
        rate=True,
    ),
    ChartSpec(
        "envs",
        "Held-out success per env",
        (SeriesSpec("{}", pattern=r"^eval/([^/]+)/success_rate$", marker=EVAL_MARKER),),
        rate=True,
    ),
    ChartSpec(
        "unsafe",
        "Unsafe rate",
        (
            SeriesSpec("held-out", "eval/unsafe_rate", marker=EVAL_MARKER),
            SeriesSpec("rollout", "rollout/unsafe_rate", marker=STEP_MARKER),
        ),
        rate=True,
    ),
    ChartSpec("reward", "Mean rollout reward", (SeriesSpec("reward", "rollout/mean_reward", marker=STEP_MARKER),)),
    ChartSpec("version", "Policy version", (SeriesSpec("version", "policy_version"),)),
    ChartSpec(
        "staleness",
        "Staleness (policy version gap of trained samples)",
        (
            SeriesSpec("mean", "rollout/version_gap_mean", marker=STEP_MARKER),
            SeriesSpec("max", "rollout/version_gap_max", marker=STEP_MARKER),
        ),
    ),
    ChartSpec("throughput", "Episodes/s", (SeriesSpec("episodes/s", "rollout/episodes_per_s", marker=STEP_MARKER),)),
    ChartSpec(
        "idle",
        "Idle fraction",
        (
            SeriesSpec("trainer", "train/idle_fraction", marker=STEP_MARKER),
            SeriesSpec("rollout", "rollout/idle_fraction", marker=STEP_MARKER),
        ),
        rate=True,
    ),
    ChartSpec("loss", "Training loss", (SeriesSpec("loss", "train/loss", marker=STEP_MARKER),)),
)


def chart_specs() -> list[dict[str, Any]]:
    """The charts as JSON for the page's script."""
    return [asdict(c) for c in CHARTS]


def _wanted() -> tuple[set[str], list[re.Pattern[str]]]:
    keys = {TIME_KEY, *GATE_KEYS}
    patterns = []
    for chart in CHARTS:
        for s in chart.series:
            keys |= {k for k in (s.key, s.marker) if k}
            if s.pattern:
                patterns.append(re.compile(s.pattern))
    return keys, patterns


_KEYS, _PATTERNS = _wanted()


def slim(row: dict[str, Any]) -> dict[str, Any]:
    """The part of a metrics row the charts use (numbers, booleans and short labels only)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in _KEYS or any(p.match(key) for p in _PATTERNS):
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None  # JSON has no NaN; a gap in the line
            elif value is None or isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) < 99):
                out[key] = value
    return out
