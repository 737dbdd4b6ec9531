"""Metrics log: `metrics.jsonl` in the run directory, one JSON object per line.

Each line carries the latest value of every metric seen so far, so any single line
is a complete snapshot (time_s, policy_version, train/*, rollout/*, eval/*).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

REQUIRED = (
    "policy_version",
    "train/step",
    "train/loss",
    "rollout/episodes",
    "rollout/success_rate",
    "eval/success_rate",
)


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.time()
        self.latest: dict[str, Any] = dict.fromkeys(REQUIRED)
        self._file = path.open("a", encoding="utf-8")

    def log(self, values: dict[str, Any]) -> dict[str, Any]:
        self.latest.update(values)
        row = {"time_s": round(time.time() - self.start, 3), **self.latest}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        return row

    def close(self) -> None:
        self._file.close()
