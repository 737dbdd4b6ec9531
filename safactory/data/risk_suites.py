"""Risk suites in the store: the cases `safactory redteam` found a policy falling for.

A case is the task of a stored episode of kind `redteam` tagged with the suite's name and
`risk_found`; its split says whether it may be trained on (`train`) or is held out (`test`).
"""

from __future__ import annotations

from safactory.data.store import TrajectoryStore
from safactory.types import Task

KIND = "redteam"


def load_risk_suite(store: TrajectoryStore, name: str) -> list[Task]:
    """The cases of risk suite `name` in the store, once each, in the order they were stored."""
    tasks: dict[str, Task] = {}
    for traj in store.iter(kind=KIND):
        if traj.tags.get("risk_suite") == name and traj.tags.get("risk_found"):
            tasks.setdefault(traj.task.id, traj.task)
    if not tasks:
        raise ValueError(f"no risk suite {name!r} in {store.url} (run `safactory redteam ... --out {name}` first)")
    return list(tasks.values())
