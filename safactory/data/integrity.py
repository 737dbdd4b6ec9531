"""Integrity: chain verification of a store (weights hashes and code versions: `safactory.provenance`).

Every trajectory carries the sha256 of its canonical encoding (`content_hash`, see
`safactory.data.codec.content_hash`) and the hash of the trajectory stored before it in the same
run (`prev_hash`); each run
records its chain head (count and last hash). `verify` walks every chain and names
the first trajectory that was modified, or that follows a deleted or reordered one,
and notices deletions at the end of a chain through the head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from safactory.data.codec import content_hash
from safactory.data.store import CorruptRecordError, TrajectoryStore


@dataclass
class VerifyReport:
    checked: int = 0
    runs: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: TrajectoryStore, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every run's hash chain (stopping at the first problem of each run), and that
    every stored trajectory belongs to a recorded run. A store that is being written to
    meanwhile verifies too: each run is checked up to the head it had when its check began."""
    report = VerifyReport()
    recorded = store.run_ids()
    for run_id in recorded:
        report.runs += 1
        problem = _verify_run(store, run_id, report, progress)
        if problem:
            report.problems.append(problem)
    for run_id in sorted(set(store.trajectory_run_ids()) - set(recorded)):
        n = store.count(run_id=run_id)
        report.problems.append(
            f"run {run_id}: {n} stored trajectories belong to no recorded run (its record was deleted)"
        )
    return report


def _verify_run(
    store: TrajectoryStore, run_id: str, report: VerifyReport, progress: Callable[[int], None] | None
) -> str | None:
    """The first problem in one run's chain, or None."""
    head = store.run_info(run_id)  # read first: what is committed while the chain is walked comes after it
    expected_prev = ""
    n = 0
    try:
        for traj in store.iter(run_id=run_id, limit=head["n_trajectories"]):
            n += 1
            report.checked += 1
            if progress is not None:
                progress(1)
            if content_hash(traj) != traj.content_hash:
                return f"run {run_id}: trajectory {traj.id} (#{n}) was modified: its content no longer matches its hash"
            if traj.prev_hash != expected_prev:
                return (
                    f"run {run_id}: trajectory {traj.id} (#{n}) does not follow its stored predecessor: "
                    f"the trajectory with hash {traj.prev_hash[:12] or '(none)'} before it was deleted or moved"
                )
            expected_prev = traj.content_hash
    except CorruptRecordError as exc:
        return f"run {run_id}: a stored trajectory was modified so that it can no longer be read: {exc}"
    if head["n_trajectories"] != n or head["head_hash"] != expected_prev:
        return (
            f"run {run_id}: the chain holds {n} trajectories but the run recorded {head['n_trajectories']} "
            f"ending in hash {head['head_hash'][:12]}: trajectories at its end were deleted or replaced"
        )
    return None
