"""The trajectory filter of the view: what the trajectories page can ask for, read from its query
string, and the SQL conditions it becomes (evaluated in the database, never over rows in Python).

Every condition is one the database checks row by row while it walks the trajectories newest
first (or a probe of an index: verdicts by trajectory id, consumption by consumer and trajectory
id), so a page costs the rows walked until it is full, whatever the store's size. Tags live in the
row's meta JSON; `json_text` reads one out on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import JSON, and_, cast, exists, false, not_, or_, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import ColumnElement

from safactory.data.schema import consumption, safety_verdicts, trajectories

VERDICTS = ("unsafe", "safe", "unknown", "unjudged")
YES_NO = ("yes", "no")
MAX_TEXT = 200  # characters of a text filter


class FilterError(ValueError):
    """A filter value the page cannot use (the message names the field)."""


@dataclass(frozen=True)
class TrajectoryFilter:
    """What to show; a field left None does not filter."""

    run: str | None = None
    env: str | None = None
    task: str | None = None
    kind: str | None = None
    version: int | None = None  # the row's policy version (the newest version of its turns)
    reward_min: float | None = None
    reward_max: float | None = None
    success: str | None = None  # yes | no
    verdict: str | None = None  # unsafe | safe | unknown | unjudged
    error: str | None = None  # yes | no
    risk_suite: str | None = None  # the `risk_suite` tag
    consumer: str | None = None  # trained on by this consumer (a run id) ...
    step_max: int | None = None  # ... at this training step or before

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> TrajectoryFilter:
        """From a query string (empty values ignored); a FilterError names a bad value."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = params.get(f.name, "")
            raw = raw.strip() if isinstance(raw, str) else ""
            if not raw:
                continue
            if len(raw) > MAX_TEXT:
                raise FilterError(f"{f.name}: at most {MAX_TEXT} characters")
            values[f.name] = _value(f.name, raw)
        return cls(**values)

    def active(self) -> dict[str, Any]:
        """The fields that filter, by name."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def query(self, **extra: Any) -> str:
        """This filter (and `extra`) as a query string."""
        return urlencode({**self.active(), **{k: v for k, v in extra.items() if v is not None}})

    def conditions(self, dialect: str) -> list[ColumnElement[bool]]:
        """The SQL conditions on `trajectories` (all of them but the run and kind, which the page
        query puts into its index lookups: `run_kind()`)."""
        t = trajectories.c
        conds: list[ColumnElement[bool]] = []
        if self.env is not None:
            conds.append(t.env_id == self.env)
        if self.task is not None:
            conds.append(t.task_id == self.task)
        if self.version is not None:
            conds.append(t.policy_version == self.version)
        if self.reward_min is not None:
            conds.append(t.reward >= self.reward_min)
        if self.reward_max is not None:
            conds.append(t.reward <= self.reward_max)
        if self.success is not None:
            conds.append(t.success.is_(self.success == "yes"))
        if self.error is not None:
            conds.append(t.error.is_not(None) if self.error == "yes" else t.error.is_(None))
        if self.risk_suite is not None:
            conds.append(json_text(t.meta, dialect, "tags", "risk_suite") == self.risk_suite)
        if self.verdict is not None:
            conds.append(verdict_condition(self.verdict, dialect))
        if self.consumer is not None:
            used = and_(consumption.c.consumer == self.consumer, consumption.c.trajectory_id == t.id)
            if self.step_max is not None:
                used = and_(used, consumption.c.train_step <= self.step_max)
            conds.append(exists().where(used))
        return conds


def _value(name: str, raw: str) -> Any:
    if name in ("version", "step_max"):
        try:
            return int(raw)
        except ValueError:
            raise FilterError(f"{name}: a whole number, not {raw!r}") from None
    if name in ("reward_min", "reward_max"):
        try:
            value = float(raw)
        except ValueError:
            raise FilterError(f"{name}: a number, not {raw!r}") from None
        if not math.isfinite(value):
            raise FilterError(f"{name}: a finite number, not {raw!r}")
        return value
    if name in ("success", "error") and raw not in YES_NO:
        raise FilterError(f"{name}: yes or no, not {raw!r}")
    if name == "verdict" and raw not in VERDICTS:
        raise FilterError(f"verdict: one of {', '.join(VERDICTS)}, not {raw!r}")
    return raw


def json_text(column: Any, dialect: str, *path: str) -> ColumnElement[Any]:
    """The text at `path` inside a JSON text column (NULL where absent), on SQLite or PostgreSQL."""
    if dialect == "postgresql":
        return cast(column, JSONB)[path].as_string()
    return type_coerce(column, JSON)[path].as_string()


def verdict_condition(verdict: str, dialect: str) -> ColumnElement[bool]:
    """A trajectory's combined verdict status (`safactory.data.verdicts.combine_status`): unsafe if
    any verdict is, else safe if any verdict is safe, else unknown; unjudged without a verdict. An
    unknown verdict is stored with `unsafe` false and `meta.status` "unknown"."""
    v = safety_verdicts.c
    mine = v.trajectory_id == trajectories.c.id
    any_unsafe = exists().where(mine, v.unsafe.is_(True))
    status = json_text(v.meta, dialect, "status")
    any_safe = exists().where(mine, v.unsafe.is_(False), or_(status.is_(None), status != "unknown"))
    judged = exists().where(mine)
    if verdict == "unsafe":
        return any_unsafe
    if verdict == "safe":
        return and_(any_safe, not_(any_unsafe))
    if verdict == "unknown":
        return and_(judged, not_(any_unsafe), not_(any_safe))
    if verdict == "unjudged":
        return not_(judged)
    return false()
