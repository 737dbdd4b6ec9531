"""Integrity and provenance: chain verification of a store, weights hashes, code versions.

Every trajectory carries the sha256 of its canonical encoding (`content_hash`, see
`Trajectory.compute_hash`) and the hash of the trajectory stored before it in the same
run (`prev_hash`); each run
records its chain head (count and last hash). `verify` walks every chain and names
the first trajectory that was modified, or that follows a deleted or reordered one,
and notices deletions at the end of a chain through the head.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from safactory.data.store import TrajectoryStore

if TYPE_CHECKING:
    import torch


@dataclass
class VerifyReport:
    checked: int = 0
    runs: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: TrajectoryStore, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every run's hash chain; stops at the first problem of each run."""
    report = VerifyReport()
    for run_id in store.run_ids():
        report.runs += 1
        expected_prev = ""
        n = 0
        problem = None
        for traj in store.iter(run_id=run_id):
            n += 1
            report.checked += 1
            if progress is not None:
                progress(1)
            if traj.compute_hash() != traj.content_hash:
                problem = (
                    f"run {run_id}: trajectory {traj.id} (#{n}) was modified: its content no longer matches its hash"
                )
            elif traj.prev_hash != expected_prev:
                problem = (
                    f"run {run_id}: trajectory {traj.id} (#{n}) does not follow its stored predecessor: "
                    f"the trajectory with hash {traj.prev_hash[:12] or '(none)'} before it was deleted or moved"
                )
            if problem:
                break
            expected_prev = traj.content_hash
        if problem is None:
            head = store.run_info(run_id)
            if head["n_trajectories"] != n or head["head_hash"] != expected_prev:
                problem = (
                    f"run {run_id}: the chain holds {n} trajectories but the run recorded {head['n_trajectories']} "
                    f"ending in hash {head['head_hash'][:12]}: trajectories at its end were deleted or replaced"
                )
        if problem:
            report.problems.append(problem)
    return report


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def code_version(path: Path | None = None) -> str:
    """The git commit of the code (with '+dirty' for local changes), else the package version."""
    root = path or Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "safactory " + version("safactory")
        except PackageNotFoundError:
            return "unknown"
