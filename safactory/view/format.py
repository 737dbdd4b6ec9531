"""How the view's pages write single values: rates, numbers, times, hashes, JSON (Jinja filters)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any


def rate(value: Any) -> str:
    """A fraction as a percentage; a metric dict ({"value", ...}) by its value; "–" for none."""
    if isinstance(value, dict):
        value = value.get("value")
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "–"
    return f"{100 * value:.1f}%"


def num(value: Any, digits: int = 3) -> str:
    """A number with up to `digits` decimals; a metric dict by its value; "–" for none."""
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if not isinstance(value, float) or not math.isfinite(value):
        return "–"
    text = f"{value:,.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def signed(value: Any, digits: int = 3) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "–"
    return f"{value:+.{digits}f}"


def when(value: Any) -> str:
    """A Unix time as local date and time."""
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def clock(value: Any) -> str:
    """Seconds as 45s, 2m30s or 1h05m."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    s = int(value)
    if s < 60:
        return f"{value:.1f}s" if value < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def short(value: Any, n: int = 12) -> str:
    return str(value or "")[:n]


def pretty(value: Any) -> str:
    """JSON as indented text (for tool-call arguments, infos, tags)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


FILTERS: dict[str, Callable[..., str]] = {
    "rate": rate,
    "num": num,
    "signed": signed,
    "when": when,
    "clock": clock,
    "short": short,
    "pretty": pretty,
}
