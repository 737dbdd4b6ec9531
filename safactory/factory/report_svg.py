"""The report's hand-made SVG line charts: the chart/series/point shapes, axis ticks, and drawing one chart
as an inline <svg> with its legend (no JavaScript, no plotting library)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from safactory.factory.report_format import esc, fmt_duration, fmt_number


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


@dataclass(frozen=True)
class Chart:
    title: str
    y_label: str
    series: tuple[Series, ...]
    y_range: tuple[float, float] | None = None  # fixed range (rates); None: fit to the data
    include_zero: bool = False


_W, _H = 760, 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 62, 18, 22, 46
_PLOT_W, _PLOT_H = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
_TIME_STEPS = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


# ---- axes -------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class _Frame:
    """The data ranges of one chart, mapped onto its plot area in SVG pixels."""

    x0: float
    x1: float
    y0: float
    y1: float

    def px(self, x: float) -> float:
        return _LEFT + (x - self.x0) / (self.x1 - self.x0) * _PLOT_W

    def py(self, y: float) -> float:
        return _TOP + (1 - (y - self.y0) / (self.y1 - self.y0)) * _PLOT_H


# ---- drawing ----------------------------------------------------------------------------------
def _grid(frame: _Frame, x_ticks: list[float], y_ticks: list[float]) -> list[str]:
    """Grid lines and tick labels on both axes."""
    parts = []
    for t in y_ticks:
        y = frame.py(t)
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + _PLOT_W}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{esc(fmt_number(t))}</text>'
        )
    for t in x_ticks:
        x = frame.px(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{_TOP + _PLOT_H}" class="grid"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{_TOP + _PLOT_H + 16}" class="tick" text-anchor="middle">'
            f"{esc(fmt_duration(t))}</text>"
        )
    return parts


def _markers(frame: _Frame, markers: list[tuple[float, str]]) -> list[str]:
    """Labelled vertical lines at the markers that fall inside the time axis."""
    parts = []
    for at, label in markers:
        if frame.x0 <= at <= frame.x1:
            x = frame.px(at)
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{_TOP + _PLOT_H}" class="marker"/>')
            parts.append(f'<text x="{x + 3:.1f}" y="{_TOP - 6}" class="marker-label">{esc(label)}</text>')
    return parts


def _axis_labels(y_label: str) -> list[str]:
    return [
        f'<text x="{_LEFT + _PLOT_W / 2:.1f}" y="{_H - 8}" class="axis-label" text-anchor="middle">'
        "time since start</text>",
        f'<text transform="translate(14 {_TOP + _PLOT_H / 2:.1f}) rotate(-90)" class="axis-label" '
        f'text-anchor="middle">{esc(y_label)}</text>',
    ]


def _line(frame: _Frame, s: Series) -> list[str]:
    """One series as a polyline, plus a dot with a tooltip per point when there are few points."""
    coords: list[str] = []
    for i, p in enumerate(s.points):
        if s.steps and i:
            coords.append(f"{frame.px(p.x):.1f},{frame.py(s.points[i - 1].y):.1f}")
        coords.append(f"{frame.px(p.x):.1f},{frame.py(p.y):.1f}")
    dash = ' stroke-dasharray="6 4"' if s.dashed else ""
    parts = [
        f'<polyline points="{" ".join(coords)}" fill="none" stroke="{s.color}" '
        f'stroke-width="{s.width}"{dash} stroke-linejoin="round"/>'
    ]
    if len(s.points) <= 60:
        for p in s.points:
            tip = f"{s.name} at {fmt_duration(p.x)}: {fmt_number(p.y)}" + (f" ({p.label})" if p.label else "")
            parts.append(
                f'<circle cx="{frame.px(p.x):.1f}" cy="{frame.py(p.y):.1f}" r="3" fill="{s.color}">'
                f"<title>{esc(tip)}</title></circle>"
            )
    return parts


def _legend(series: list[Series]) -> str:
    return "".join(
        f'<span class="key"><span class="swatch{" dashed" if s.dashed else ""}" '
        f'style="border-color:{s.color}"></span>{esc(s.name)}</span>'
        for s in series
    )


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
    frame = _Frame(x0, x1, y0, y1)
    parts = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{esc(chart.title)}</title>',
        f'<rect x="{_LEFT}" y="{_TOP}" width="{_PLOT_W}" height="{_PLOT_H}" class="plot"/>',
        *_grid(frame, x_ticks, y_ticks),
        *_markers(frame, markers or []),
        *_axis_labels(chart.y_label),
    ]
    for s in series:
        parts += _line(frame, s)
    parts.append("</svg>")
    return (
        f'<figure class="figure"><figcaption>{esc(chart.title)}</figcaption>{"".join(parts)}'
        f'<div class="legend">{_legend(series)}</div></figure>'
    )
