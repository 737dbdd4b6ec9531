"""Reading a run's metrics.jsonl rows for the report: which rows carry a new value of a series, the
evaluations and phases they record, and the warm-start/final pair rebuilt from them.

metrics.jsonl rows are snapshots that carry old values forward, so each series is
sampled only where it is new: held-out (eval/*) values where an evaluation happened
(`eval/phase` or an eval value changed), train/* and rollout/* values where
`train/step` moved.
"""

from __future__ import annotations

import math
import re
from typing import Any

from safactory.factory.metrics import as_number

RATES = ("success_rate", "unsafe_rate", "benign_success_rate")
_ENV_KEY = re.compile(r"^eval/(?P<env>.+)/(?P<metric>success_rate|unsafe_rate|benign_success_rate)$")


def finite(value: Any) -> float | None:
    """`value` as a finite float; None for booleans, non-numbers, NaN and infinities."""
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
            key.startswith("eval/") and key != "eval/phase" and finite(value) is not None and value != previous.get(key)
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


def env_ids(rows: list[dict[str, Any]]) -> list[str]:
    """The environments that have per-env held-out rates in the rows, sorted."""
    found = {m.group("env") for row in rows for key in row if (m := _ENV_KEY.match(key))}
    return sorted(found)


def phase_starts(rows: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """(time, phase) where the `phase` column takes a new value."""
    starts = []
    for i in changed_rows(rows, "phase"):
        x = finite(rows[i].get("time_s"))
        if x is not None:
            starts.append((x, str(rows[i]["phase"])))
    return starts


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
    points = [i for i in points if any(finite(rows[i].get(f"eval/{m}")) is not None for m in RATES)]
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
