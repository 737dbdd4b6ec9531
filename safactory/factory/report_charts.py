"""Which charts a run's metrics rows support, and the series drawn in each (sampled where a value is new,
thinned when long, coloured from one palette)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from safactory.factory.report_rows import changed_rows, env_ids, eval_rows, evals_by_learner, finite
from safactory.factory.report_svg import Chart, Point, Series

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
_HELDOUT_CHARTS = (
    ("success_rate", "Held-out success rate"),
    ("unsafe_rate", "Held-out unsafe rate"),
    ("benign_success_rate", "Held-out benign success rate"),
)


def _points(rows: list[dict[str, Any]], indices: Iterable[int], key: str, label_key: str | None = None) -> list[Point]:
    points: list[Point] = []
    for i in indices:
        row = rows[i]
        x, y = finite(row.get("time_s")), finite(row.get(key))
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


def _per_step(rows: list[dict[str, Any]], trained: list[int], key: str) -> list[Point]:
    """`key` where the train step moved (or, in a log without train steps, where `key` itself changed)."""
    return _points(rows, trained if trained else changed_rows(rows, key), key)


def _heldout_chart(rows: list[dict[str, Any]], evals: list[int], envs: list[str], metric: str, title: str) -> Chart:
    """One held-out rate over time: overall and per env, a dashed set of lines per extra learner."""
    env_color = {env: _PALETTE[(i + 1) % len(_PALETTE)] for i, env in enumerate(envs)}
    series: list[Series] = []
    for learner, indices in evals_by_learner(rows, evals).items():
        prefix, dashed = (f"{learner}: ", True) if learner else ("", False)
        overall = _thin(_points(rows, indices, f"eval/{metric}", "eval/phase"))
        series.append(Series(prefix + ("all envs" if envs else "held-out"), overall, _PALETTE[0], 2.6, dashed))
        for env in envs:
            points = _thin(_points(rows, indices, f"eval/{env}/{metric}", "eval/phase"))
            series.append(Series(prefix + env, points, env_color[env], 1.6, dashed))
    return Chart(title, metric.replace("_", " "), tuple(series), (0.0, 1.0))


def _simple_chart(
    rows: list[dict[str, Any]], trained: list[int], title: str, y_label: str, keys: list[tuple[str, str]], **kw: Any
) -> Chart:
    """A chart of per-step series, one per (key, name) in `keys`."""
    series = tuple(
        Series(name, _thin(_per_step(rows, trained, key)), _PALETTE[i]) for i, (key, name) in enumerate(keys)
    )
    return Chart(title, y_label, series, **kw)


def _version_chart(rows: list[dict[str, Any]]) -> Chart:
    """The policy version as a staircase, held on to the last row."""
    version_points = _points(rows, changed_rows(rows, "policy_version"), "policy_version")
    last = _points(rows, [len(rows) - 1], "policy_version") if rows else []
    if version_points and last and last[0].x > version_points[-1].x:
        version_points.append(last[0])
    return Chart(
        "Policy version",
        "version",
        (Series("policy version", _thin(version_points), _PALETTE[0], steps=True),),
        include_zero=True,
    )


def _staleness_chart(rows: list[dict[str, Any]], trained: list[int]) -> Chart:
    gap_mean = _per_step(rows, trained, "rollout/version_gap_mean")
    gap_max = _per_step(rows, trained, "rollout/version_gap_max")
    return Chart(
        "Staleness (policy versions between generation and training)",
        "version gap",
        (
            Series("mean gap", _thin(gap_mean), _PALETTE[0]),
            Series("max gap", _thin(gap_max), _PALETTE[3], dashed=True),
        ),
        include_zero=True,
    )


def build_charts(rows: list[dict[str, Any]]) -> list[Chart]:
    """The charts the rows have data for, in reading order."""
    evals = eval_rows(rows)
    trained = changed_rows(rows, "train/step")
    envs = env_ids(rows)
    charts = [_heldout_chart(rows, evals, envs, metric, title) for metric, title in _HELDOUT_CHARTS]
    charts += [
        _simple_chart(
            rows,
            trained,
            "Rollout success and unsafe rates",
            "rate",
            [("rollout/success_rate", "success rate"), ("rollout/unsafe_rate", "unsafe rate")],
            y_range=(0.0, 1.0),
        ),
        _simple_chart(rows, trained, "Mean rollout reward", "reward", [("rollout/mean_reward", "mean reward")]),
        _simple_chart(rows, trained, "Training loss", "loss", [("train/loss", "loss")]),
        _version_chart(rows),
        _staleness_chart(rows, trained),
        _simple_chart(
            rows,
            trained,
            "Throughput",
            "episodes / s",
            [("rollout/episodes_per_s", "episodes per second")],
            include_zero=True,
        ),
        _simple_chart(
            rows,
            trained,
            "Idle fractions",
            "fraction of time idle",
            [("train/idle_fraction", "trainer"), ("rollout/idle_fraction", "rollout workers")],
            y_range=(0.0, 1.0),
        ),
    ]
    return [c for c in charts if any(s.points for s in c.series)]
