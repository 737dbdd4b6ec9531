"""Metrics log: `metrics.jsonl` in the run directory, one JSON object per line.

Each line carries the latest value of every metric seen so far, so any single line
is a complete snapshot (time_s, policy_version, train/*, rollout/*, eval/*).

Besides the file, every row can be handed to sinks (TensorBoard, W&B, MLflow). The
sinks see the same snapshots; they work out for themselves which values are new.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from safactory.factory.tensorboard import TensorBoardWriter

REQUIRED = (
    "policy_version",
    "train/step",
    "train/loss",
    "rollout/episodes",
    "rollout/success_rate",
    "eval/success_rate",
)

STEP_KEY = "train/step"
TIME_KEY = "time_s"

logger = logging.getLogger(__name__)


class MetricsSink(Protocol):
    """Somewhere besides metrics.jsonl that each snapshot row is sent to."""

    def write(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


# ---- reading the log back ------------------------------------------------------------------
def read_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """All readable rows of a metrics.jsonl and how many lines were skipped as unreadable.

    A run killed mid-write leaves a truncated last line; such lines (and any other line
    that is not a JSON object) are skipped rather than failing the reader.
    """
    rows: list[dict[str, Any]] = []
    skipped = 0
    if not path.is_file():
        return rows, skipped
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                skipped += 1
    return rows, skipped


def _drop_partial_tail(path: Path) -> str | None:
    """Cut a line left unfinished by a crash; returns the last complete line, if any."""
    chunk = 1 << 16
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        buf = b""
        pos = size
        # read backwards until the buffer holds the last complete line (two newlines) or the whole file
        while pos > 0 and buf.count(b"\n") < 2:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
        end = buf.rfind(b"\n")
        if end + 1 < len(buf):  # bytes after the last newline: an unfinished record
            f.truncate(pos + end + 1)
        if end < 0:
            return None
        start = buf.rfind(b"\n", 0, end) + 1
        return buf[start:end].decode("utf-8", errors="replace")


def last_row(path: Path) -> dict[str, Any] | None:
    """The last complete row of a metrics.jsonl (None if there is none); use its time_s to resume."""
    rows, _ = read_rows(path)
    return rows[-1] if rows else None


# ---- the log -----------------------------------------------------------------------------
class MetricsLog:
    """Appends full-snapshot rows to `path` and forwards each row to the sinks.

    `time_offset` is added to time_s, so a resumed run keeps a rising clock. With
    `resume=True` the last complete row of an existing file is the starting snapshot.
    A line left half-written by a crash is always cut before appending.
    """

    def __init__(
        self,
        path: Path,
        *,
        sinks: list[MetricsSink] | None = None,
        time_offset: float = 0.0,
        resume: bool = False,
    ) -> None:
        self.path = path
        self.start = time.time()
        self.time_offset = time_offset
        self.sinks: list[MetricsSink] = list(sinks or [])
        self.latest: dict[str, Any] = dict.fromkeys(REQUIRED)
        if path.is_file():
            last = _drop_partial_tail(path)
            if resume and last:
                try:
                    previous = json.loads(last)
                except ValueError:
                    previous = None
                if isinstance(previous, dict):
                    previous.pop(TIME_KEY, None)
                    self.latest.update(previous)
        self._file = path.open("a", encoding="utf-8")

    def elapsed(self) -> float:
        """Seconds since the start of the run (including `time_offset`), as written in time_s."""
        return round(time.time() - self.start + self.time_offset, 3)

    def log(self, values: dict[str, Any]) -> dict[str, Any]:
        self.latest.update(values)
        row = {TIME_KEY: self.elapsed(), **self.latest}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for sink in list(self.sinks):
            try:
                sink.write(row)
            except Exception:  # a broken dashboard must not stop training; metrics.jsonl still has it all
                logger.warning("metrics sink %s failed and is switched off", type(sink).__name__, exc_info=True)
                self.sinks.remove(sink)
                _close_quietly(sink)
        return row

    def close(self) -> None:
        for sink in self.sinks:
            _close_quietly(sink)
        self.sinks = []
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_quietly(sink: MetricsSink) -> None:
    try:
        sink.close()
    except Exception:
        logger.warning("closing metrics sink %s failed", type(sink).__name__, exc_info=True)


# ---- which values of a row are new ---------------------------------------------------------
def as_number(value: Any) -> float | None:
    """A row value as a float for plotting/logging (bools become 0/1); None for anything else."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:
            return math.copysign(math.inf, value)
    return None


# a change of the trigger key re-sends every value under these prefixes, even unchanged ones
_GROUPS = {"eval/phase": ("eval/",), STEP_KEY: ("train/", "rollout/")}
_MISSING = object()


class RowChanges:
    """Turns successive snapshot rows into (step, values that are new in this row).

    A value counts as new when it differs from the previous row, and also when its group
    was refreshed: a new `eval/phase` re-sends all eval/* values (an evaluation may repeat
    a score), a new `train/step` all train/* and rollout/* values. The step is
    `train/step` when it is a number, otherwise a counter of rows seen.
    """

    def __init__(self) -> None:
        self._previous: dict[str, Any] = {}
        self._rows = 0

    def update(self, row: dict[str, Any]) -> tuple[int, dict[str, float]]:
        self._rows += 1
        previous, self._previous = self._previous, dict(row)
        refreshed = tuple(
            prefix
            for trigger, prefixes in _GROUPS.items()
            if row.get(trigger) is not None and row.get(trigger) != previous.get(trigger, _MISSING)
            for prefix in prefixes
        )
        values: dict[str, float] = {}
        for key, value in row.items():
            if key == TIME_KEY:
                continue
            number = as_number(value)
            if number is None:
                continue
            if value != previous.get(key, _MISSING) or key.startswith(refreshed):
                values[key] = number
        step_value = row.get(STEP_KEY)
        step = int(step_value) if isinstance(step_value, int | float) and not isinstance(step_value, bool) else None
        return (self._rows if step is None else step), values


# ---- sinks -------------------------------------------------------------------------------
class TensorBoardSink:
    """Scalars of each row that changed, as a TensorBoard event file under `log_dir`."""

    def __init__(self, log_dir: Path) -> None:
        self.writer = TensorBoardWriter(log_dir)
        self._changes = RowChanges()

    def write(self, row: dict[str, Any]) -> None:
        step, values = self._changes.update(row)
        if values:
            self.writer.add_scalars(values, step)
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _require(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeError(
            f"{what} logging was requested but the `{module}` package is not installed: "
            f"pip install {module} (or turn {what} logging off)"
        ) from exc


class WandbSink:
    """Values of each row that changed, logged to a Weights & Biases run (files under `run_dir`)."""

    def __init__(self, run_dir: Path, run_name: str) -> None:
        wandb = _require("wandb", "W&B")
        # WANDB_PROJECT / WANDB_MODE and friends from the environment still apply
        project = None if os.environ.get("WANDB_PROJECT") else "safactory"
        self.run = wandb.init(project=project, name=run_name, dir=str(run_dir))
        self._changes = RowChanges()

    def write(self, row: dict[str, Any]) -> None:
        _, values = self._changes.update(row)
        if values:
            # W&B wants a steadily increasing step of its own; train/step travels as a value
            self.run.log(values)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """Values of each row that changed, logged to an MLflow run.

    The tracking server is MLFLOW_TRACKING_URI when set, else a file store in `run_dir/mlruns`.
    """

    EXPERIMENT = "safactory"

    def __init__(self, run_dir: Path, run_name: str) -> None:
        mlflow = _require("mlflow", "MLflow")
        self._metric = _require("mlflow.entities", "MLflow").Metric
        uri = None if os.environ.get("MLFLOW_TRACKING_URI") else (run_dir / "mlruns").resolve().as_uri()
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(self.EXPERIMENT)
        experiment_id = (
            experiment.experiment_id if experiment is not None else self.client.create_experiment(self.EXPERIMENT)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self._changes = RowChanges()

    def write(self, row: dict[str, Any]) -> None:
        step, values = self._changes.update(row)
        if values:
            stamp = int(time.time() * 1000)
            metrics = [self._metric(key, value, stamp, step) for key, value in values.items()]
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def make_sinks(
    run_dir: Path,
    tensorboard: bool = True,
    wandb: bool = False,
    mlflow: bool = False,
    run_name: str = "run",
) -> list[MetricsSink]:
    """The sinks asked for; TensorBoard logs go to `run_dir/tensorboard/`.

    W&B and MLflow are imported only when asked for, and a RuntimeError says how to
    install them when they are missing.
    """
    sinks: list[MetricsSink] = []
    try:
        if tensorboard:
            sinks.append(TensorBoardSink(run_dir / "tensorboard"))
        if wandb:
            sinks.append(WandbSink(run_dir, run_name))
        if mlflow:
            sinks.append(MlflowSink(run_dir, run_name))
    except BaseException:
        for sink in sinks:
            _close_quietly(sink)
        raise
    return sinks
