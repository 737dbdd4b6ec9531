"""The runs the view lists: the store's runs joined with the run directories by run id.

A run may be in the store only (an evaluation, a red-team search, a run whose directory is
elsewhere), in a directory only (its store is another one), or both. Each gets a status, its
envs, its versions, its best held-out success and latest held-out unsafe rate (from its summary,
or from its metrics while it runs) and its gate decisions (from the store, else its summary).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safactory.view.queries import StoreReader
from safactory.view.rundirs import RunDir, config_envs, find_dirs, read_metrics


@dataclass
class RunRow:
    """One run as the runs page shows it."""

    run_id: str
    status: str  # running | finished | crashed | stored (no directory)
    directory: RunDir | None
    created_at: float | None
    n_trajectories: int | None  # None: not in the store
    envs: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    best_success: float | None = None
    unsafe_rate: float | None = None
    gates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return sum(1 for g in self.gates if g.get("accepted"))

    @property
    def rejected(self) -> int:
        return sum(1 for g in self.gates if g.get("accepted") is False)


def heldout(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """A summary's held-out evaluations (`phases` and `evals`), each with its label, oldest first."""
    found = []
    for block in ("phases", "evals"):
        section = summary.get(block)
        if isinstance(section, dict):
            found += [{"label": k, **v} for k, v in section.items() if isinstance(v, dict)]
    return sorted(found, key=lambda e: float(e.get("time_s") or 0.0))


def _metric_series(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)]


class RunCatalog:
    """The runs of one store and one runs folder."""

    def __init__(self, reader: StoreReader | None, runs_dir: Path | None) -> None:
        self.reader = reader
        self.runs_dir = runs_dir

    def dirs(self) -> tuple[list[RunDir], list[Path]]:
        return find_dirs(self.runs_dir)

    def directory(self, run_id: str) -> RunDir | None:
        return next((d for d in self.dirs()[0] if d.run_id == run_id or d.name == run_id), None)

    def rows(self) -> list[RunRow]:
        """Every run: those with a directory first (most recently written first), then the store's others."""
        stored = {r["id"]: r for r in self.reader.runs()} if self.reader is not None else {}
        out = []
        seen: set[str] = set()
        for d in self.dirs()[0]:
            out.append(self.row(d.run_id, d, stored.get(d.run_id)))
            seen.add(d.run_id)
        out += [self.row(run_id, None, info) for run_id, info in stored.items() if run_id not in seen]
        return out

    def find(self, run_id: str) -> RunRow | None:
        directory = self.directory(run_id)
        if directory is not None:
            run_id = directory.run_id
        info = self.reader.run(run_id) if self.reader is not None else None
        if directory is None and info is None:
            return None
        return self.row(run_id, directory, info)

    def row(self, run_id: str, directory: RunDir | None, info: dict[str, Any] | None) -> RunRow:
        row = RunRow(
            run_id=run_id,
            status=directory.status() if directory is not None else "stored",
            directory=directory,
            created_at=info["created_at"] if info else None,
            n_trajectories=info["n_trajectories"] if info else None,
        )
        config = info["config"] if info else directory.config() if directory else {}
        row.envs = config_envs(config) if isinstance(config, dict) else []
        if self.reader is not None and info is not None:
            row.versions = [c["version"] for c in self.reader.checkpoints(run_id)]
            row.gates = self.reader.gate_decisions(run_id)
        summary = directory.summary() if directory is not None else {}
        if not row.gates:
            row.gates = [g for g in summary.get("gate", []) if isinstance(g, dict)]
        evals = heldout(summary)
        successes = [float(e["success_rate"]) for e in evals if isinstance(e.get("success_rate"), int | float)]
        unsafe = [float(e["unsafe_rate"]) for e in evals if isinstance(e.get("unsafe_rate"), int | float)]
        if directory is not None and (not successes or directory.status() == "running"):
            metrics, _ = read_metrics(directory.path)
            successes += _metric_series(metrics, "eval/success_rate")
            unsafe = unsafe or _metric_series(metrics, "eval/unsafe_rate")[-1:]
            if not row.versions:
                row.versions = sorted({int(v) for v in _metric_series(metrics, "policy_version")})
        row.best_success = max(successes) if successes else None
        row.unsafe_rate = unsafe[-1] if unsafe else None
        return row
