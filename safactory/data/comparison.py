"""Two evaluations side by side, with a paired test on their shared tasks (`safactory eval compare A B`
and the evaluations page of `safactory view`).

For every env (and overall) each metric's difference B - A; then on the tasks both evaluated,
per task the success rate over its attempts, and an exact two-sided sign test over the tasks
whose rates differ (the chance of a split at least this uneven if neither is better). The
tasks whose success fell from A to B are listed as regressions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def load_eval(path: str | Path) -> dict[str, Any]:
    """An evaluation's `eval.json`, from its directory or the file itself."""
    path = Path(path)
    file = path / "eval.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no eval.json (run `safactory eval ... --out {path}` first)")
    return json.loads(file.read_text())


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value for `wins` against `losses` (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    envs = [e for e in a["metrics"] if e in b["metrics"]]
    differences: dict[str, dict[str, float]] = {}
    for env in envs:
        row: dict[str, float] = {}
        for key, metric in a["metrics"][env].items():
            other = b["metrics"][env].get(key)
            if isinstance(metric, dict) and isinstance(other, dict):
                row[key] = other["value"] - metric["value"]
        differences[env] = row
    paired: dict[str, Any] = {}
    for env in [e for e in a.get("tasks", {}) if e in b.get("tasks", {})]:
        ta, tb = a["tasks"][env], b["tasks"][env]
        shared = sorted(set(ta) & set(tb))
        rate_a = {t: sum(ta[t]) / len(ta[t]) for t in shared}
        rate_b = {t: sum(tb[t]) / len(tb[t]) for t in shared}
        better = [t for t in shared if rate_b[t] > rate_a[t]]
        worse = [t for t in shared if rate_b[t] < rate_a[t]]
        paired[env] = {
            "shared_tasks": len(shared),
            "improved": len(better),
            "regressed": len(worse),
            "p_value": sign_test(len(better), len(worse)),
            "regressed_tasks": worse,
        }
    return {"a": _label(a), "b": _label(b), "differences": differences, "paired": paired}


def _label(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result.get(k) for k in ("suite", "policy", "policy_version", "weights_hash", "run_id")}
