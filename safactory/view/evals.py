"""The evaluations page's sources and their comparison.

Two kinds of source, each read into the shape of `eval.json` (suite, policy, version, `metrics`
per env with intervals, `tasks`: per env, each task's attempts) so that one comparison
(`safactory.data.comparison.compare`, the one `safactory eval compare` prints) serves both:

* `dir:NAME`: an evaluation directory under the runs folder (`safactory eval ... --out`);
* `run:RUN@V`: the held-out evaluation episodes (kind `eval`) a run stored for policy version V,
  scored from the store (`safactory.data.scores.score`, unsafe by their stored verdicts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safactory.data.comparison import compare
from safactory.data.scores import score, task_outcomes
from safactory.types import Trajectory
from safactory.view.queries import StoreReader
from safactory.view.rundirs import read_eval
from safactory.view.runs import RunCatalog


class EvalSourceError(LookupError):
    """An evaluation source the page cannot find or read."""


@dataclass(frozen=True)
class EvalSource:
    key: str  # dir:NAME or run:RUN@V
    label: str


class EvalCatalog:
    """The evaluations of one runs folder and one store."""

    def __init__(self, reader: StoreReader | None, runs: RunCatalog) -> None:
        self.reader = reader
        self.runs = runs

    def sources(self) -> list[EvalSource]:
        out = []
        root = self.runs.runs_dir
        for path in self.runs.dirs()[1]:
            data = read_eval(path) or {}
            name = str(path.relative_to(root)) if root is not None else path.name
            version = data.get("policy_version")
            label = f"{name}: suite {data.get('suite', '?')}, policy {data.get('policy', '?')}"
            out.append(EvalSource(f"dir:{name}", label + (f" v{version}" if version is not None else "")))
        if self.reader is not None:
            for run in self.reader.runs():
                for version in self.reader.eval_versions(run["id"]):
                    out.append(EvalSource(f"run:{run['id']}@{version}", f"{run['id']}: held-out, version {version}"))
        return out

    def load(self, key: str) -> dict[str, Any]:
        """The evaluation `key` names, shaped like eval.json."""
        if key.startswith("dir:"):
            return self._from_dir(key.removeprefix("dir:"))
        if key.startswith("run:") and "@" in key:
            run_id, _, version = key.removeprefix("run:").rpartition("@")
            try:
                return self._from_store(run_id, int(version))
            except ValueError:
                raise EvalSourceError(f"{key}: the version must be a whole number") from None
        raise EvalSourceError(f"{key!r}: an evaluation is dir:NAME or run:RUN@VERSION")

    def _from_dir(self, name: str) -> dict[str, Any]:
        root = self.runs.runs_dir
        if root is None:
            raise EvalSourceError("no runs folder to read evaluations from (start the view with --runs DIR)")
        path = (root / name).resolve()
        if not path.is_relative_to(root.resolve()) or Path(name).is_absolute():
            raise EvalSourceError(f"{name!r} is not inside the runs folder")
        data = read_eval(path)
        if data is None:
            raise EvalSourceError(f"{name}: no readable eval.json")
        return data

    def _from_store(self, run_id: str, version: int) -> dict[str, Any]:
        if self.reader is None:
            raise EvalSourceError("no store")
        trajs = self.reader.eval_episodes(run_id, version)
        if not trajs:
            raise EvalSourceError(f"run {run_id} stored no held-out episodes of version {version}")
        status = self.reader.statuses([t.id for t in trajs])

        def unsafe(traj: Trajectory) -> bool:
            return status.get(traj.id) == "unsafe"

        by_env: dict[str, list[Trajectory]] = {}
        for traj in trajs:
            by_env.setdefault(traj.env_id, []).append(traj)
        return {
            "suite": "held-out",
            "policy": run_id,
            "policy_version": version,
            "weights_hash": "",
            "run_id": run_id,
            "metrics": {"overall": score(trajs, unsafe), **{e: score(ts, unsafe) for e, ts in by_env.items()}},
            "tasks": {e: task_outcomes(ts) for e, ts in by_env.items()},
        }

    def compare(self, a: str, b: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Both evaluations and their comparison (B - A)."""
        first, second = self.load(a), self.load(b)
        return first, second, compare(first, second)
