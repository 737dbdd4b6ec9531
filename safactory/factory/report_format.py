"""How the report writes single values as text: HTML escaping, clock durations, axis numbers and table cells."""

from __future__ import annotations

import html
import json
import math
from typing import Any


def esc(value: object) -> str:
    """`value` as text that is safe inside HTML, attribute values included."""
    return html.escape(str(value), quote=True)


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
    """A chart tick or point value: short, without trailing zeros."""
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.3g}"
    if value == int(value):
        return str(int(value))
    return f"{value:.3f}".rstrip("0").rstrip(".")


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
