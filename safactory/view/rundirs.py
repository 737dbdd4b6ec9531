"""Run and evaluation directories as the view reads them, by path and JSON only.

A run directory (`safactory run ... --out DIR`) holds `state.json` (run id, stage reached, the
summary so far), `metrics.jsonl` (one snapshot per line, appended while the run goes),
`summary.json` and `report.html` once it ends, and `config.yaml`. An evaluation directory
(`safactory eval ... --out DIR`) holds `eval.json`. Directories are found in the `--runs` folder
itself, its children and their children.

A run's status: finished once its state says `done`; running while its metrics or state were
written within `live_s` seconds; otherwise crashed (it stopped before its end: `--resume` it).
Metrics are read from a byte offset on, whole lines only, so a page polling a live run reads
only what was appended since its last poll.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
CONFIG_FILE = "config.yaml"
EVAL_FILE = "eval.json"
LIVE_S = 300.0  # a run whose files changed this recently counts as running
MAX_DEPTH = 2
MAX_READ_BYTES = 16 * 1024 * 1024  # metrics read per request at most (the page asks again for the rest)


@dataclass(frozen=True)
class RunDir:
    """One run directory."""

    path: Path
    run_id: str
    stage: str
    state: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    def status(self, now: float | None = None, live_s: float = LIVE_S) -> str:
        if self.stage == "done":
            return "finished"
        now = time.time() if now is None else now
        return "running" if now - self.last_write() <= live_s else "crashed"

    def last_write(self) -> float:
        times = [p.stat().st_mtime for p in (self.path / METRICS_FILE, self.path / STATE_FILE) if p.is_file()]
        return max(times, default=0.0)

    def summary(self) -> dict[str, Any]:
        """The summary: `summary.json` once the run ended, else what `state.json` holds so far."""
        final = _read_json(self.path / SUMMARY_FILE)
        if isinstance(final, dict) and self.stage == "done":
            return final
        summary = self.state.get("summary")
        return summary if isinstance(summary, dict) else {}

    def config(self) -> dict[str, Any]:
        try:
            data = yaml.safe_load((self.path / CONFIG_FILE).read_text())
        except (OSError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    def has_report(self) -> bool:
        return (self.path / REPORT_FILE).is_file()


def find_dirs(root: Path | None) -> tuple[list[RunDir], list[Path]]:
    """The run directories and the evaluation directories (holding eval.json) under `root`."""
    if root is None or not root.is_dir():
        return [], []
    runs: list[RunDir] = []
    evals: list[Path] = []
    level = [root]
    for depth in range(MAX_DEPTH + 1):
        nxt: list[Path] = []
        for folder in level:
            run = read_run_dir(folder)
            if run is not None:
                runs.append(run)
                continue  # a run's own folders (model, checkpoints) are not runs
            if (folder / EVAL_FILE).is_file():
                evals.append(folder)
                continue
            if depth < MAX_DEPTH:
                nxt += _subfolders(folder)
        level = nxt
    runs.sort(key=lambda r: r.last_write(), reverse=True)
    evals.sort(key=lambda p: (p / EVAL_FILE).stat().st_mtime, reverse=True)
    return runs, evals


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def read_run_dir(path: Path) -> RunDir | None:
    """The run directory at `path`, or None when it holds no state.json (or an unreadable one)."""
    state = _read_json(path / STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("run_id"), str):
        return None
    return RunDir(path=path, run_id=state["run_id"], stage=str(state.get("stage", "")), state=state)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_metrics(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The metrics rows of complete lines from byte `offset` on, and the offset after the last one.

    A line still being written (no newline yet) is left for the next read; an unreadable line is
    skipped, as the run's own reader does. An offset past the end (a file rewritten) starts over."""
    file = path / METRICS_FILE
    try:
        with file.open("rb") as f:
            size = f.seek(0, 2)
            if offset > size:
                offset = 0
            f.seek(offset)
            chunk = f.read(MAX_READ_BYTES)
    except OSError:
        return [], offset
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    rows: list[dict[str, Any]] = []
    for line in chunk[: end + 1].splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, offset + end + 1


def read_eval(path: Path) -> dict[str, Any] | None:
    data = _read_json(path / EVAL_FILE)
    return data if isinstance(data, dict) and isinstance(data.get("metrics"), dict) else None


def config_envs(config: dict[str, Any]) -> list[str]:
    """The env ids of a run config (its `envs:` list, or the single `env:`)."""
    envs = config.get("envs")
    if isinstance(envs, list) and envs:
        return [str(e.get("id")) for e in envs if isinstance(e, dict) and e.get("id")]
    env = config.get("env")
    if isinstance(env, dict) and env.get("id"):
        return [str(env["id"])]
    return []
