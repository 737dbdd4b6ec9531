"""The row codec of the store: trajectories into the rows of its tables, and rows back into
trajectories.

Writing: `_task_rows` gives the rows of the distinct tasks (hashing each task once, via
`TaskHashes`), `_rows` hashes and chains one trajectory and appends its trajectory, step
and token-trace rows, in the column order of `safactory.data.schema`. The row texts and
blobs are the very parts `safactory.data.codec.encode_trajectory` hashed.

Reading: `_trajectory`, `_step` and `_trace` rebuild the records from their rows; a row
that does not decode raises ValueError, TypeError or KeyError (the store names the
trajectory in a CorruptRecordError). `row_problem` says why a trajectory's rows do not
match its content: its steps against its `n_steps`, its derived columns against its
content, and its content hash taken over the stored texts and blobs (so the reward and
success a reader gets are the hashed ones).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic_core import to_json

from safactory.data.codec import StoredTrace, content_hash, encode_trajectory, stored_content_hash
from safactory.types import Step, Task, TokenTrace, Trajectory, canonical_json, sha256_hex

# ---- trajectories into rows -------------------------------------------------------------
_task_json = Task.__pydantic_serializer__.to_json


class TaskHashes:
    """Task hashes by the task's pydantic JSON: a task seen before (a group's trajectories,
    the next epoch) skips its sorted-key canonical JSON. Equal pydantic JSON means an equal
    task (the canonical form only adds key sorting); bounded, cleared when full."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._by_json: dict[bytes, tuple[str, str]] = {}

    def get(self, task: Task) -> tuple[str, str]:
        """(hash, canonical JSON body) of `task`."""
        key = _task_json(task)
        found = self._by_json.get(key)
        if found is None:
            body = canonical_json(task.model_dump())
            found = (sha256_hex(body), body)
            if len(self._by_json) >= self.size:
                self._by_json.clear()
            self._by_json[key] = found
        return found


def _task_rows(items: list[Trajectory], hashes: TaskHashes) -> dict[str, tuple[Any, ...]]:
    """Set each trajectory's `task_hash`; return the rows of their distinct tasks, by hash."""
    out: dict[str, tuple[Any, ...]] = {}
    for traj in items:
        task = traj.task
        digest, body = hashes.get(task)
        if digest not in out:
            out[digest] = (digest, task.id, task.env_id, task.split, body)
        traj.task_hash = digest
    return out


def _versions_text(versions: list[int]) -> str:
    if not versions:
        return "[]"
    if len(versions) == 1 and type(versions[0]) is int:
        return f"[{versions[0]}]"
    return to_json(versions).decode()


def _rows(
    traj: Trajectory, prev_hash: str, created_at: float, traj_rows: list, step_rows: list, trace_rows: list
) -> None:
    """Hash and chain one trajectory (its `task_hash` set already by `_task_rows`) and append
    its rows, columns as in the *_COLUMNS of `safactory.data.schema`. The row texts and blobs
    are the very parts `encode_trajectory` hashed, so each is serialised once."""
    enc = encode_trajectory(traj, traj.task_hash)
    # a trajectory recorded as version 3 keeps its original (sorted-key JSON) hash
    traj.content_hash = enc.content_hash if traj.schema_version >= 4 else content_hash(traj)
    traj.prev_hash = prev_hash
    tid = traj.id
    policy_version: int | None = None
    for index, reward, error, action, observation, info, trace in enc.steps:
        step_rows.append((tid, index, action.decode(), observation.decode(), reward, info.decode(), error))
        if trace is None:
            continue
        version, versions, *rest = trace
        top = max(versions) if versions else version
        if policy_version is None or top > policy_version:
            policy_version = top
        trace_rows.append((tid, index, version, _versions_text(versions), *rest))
    task = traj.task
    traj_rows.append(
        (
            tid,
            traj.run_id,
            traj.kind,
            traj.group_id,
            traj.task_hash,
            task.id,
            task.split,
            traj.env_id,
            traj.env_version,
            traj.seed,
            policy_version,
            len(traj.steps),
            traj.reward + 0.0,
            traj.success,
            traj.termination,
            traj.error,
            created_at,
            traj.content_hash,
            prev_hash,
            enc.meta.decode(),
        )
    )


# ---- rows into trajectories -------------------------------------------------------------
def _blob_ids(blob: bytes) -> list[int]:
    return np.frombuffer(blob, dtype="<i4").astype(np.int64).tolist()


def _trajectory(r: Any) -> Trajectory:
    """A trajectory (without its steps) from its row joined with its task's body."""
    return Trajectory.model_validate(
        {
            **json.loads(r["meta"]),
            "id": r["id"],
            "run_id": r["run_id"],
            "group_id": r["group_id"],
            "kind": r["kind"],
            "task": json.loads(r["task_body"]),
            "task_hash": r["task_hash"],
            "env_id": r["env_id"],
            "env_version": r["env_version"],
            "seed": r["seed"],
            "reward": r["reward"],
            "success": r["success"],
            "termination": r["termination"],
            "error": r["error"],
            "content_hash": r["content_hash"],
            "prev_hash": r["prev_hash"],
        }
    )


def _step(r: Mapping[str, Any]) -> Step:
    """A step from its row."""
    return Step(
        index=r["idx"],
        action=json.loads(r["action"]),
        observation=json.loads(r["observation"]),
        reward=r["reward"],
        info=json.loads(r["info"]),
        error=r["error"],
    )


def _trace(r: Mapping[str, Any], prompt: list[int], completion: list[int]) -> TokenTrace:
    """A token trace from its row, given its full prompt and completion ids."""
    return TokenTrace(
        prompt_ids=prompt,
        completion_ids=completion,
        logprobs=None if r["logprobs"] is None else np.frombuffer(r["logprobs"], dtype="<f4").tolist(),
        policy_version=r["policy_version"],
        policy_versions=json.loads(r["policy_versions"]),
        temperature=r["temperature"],
        top_p=r["top_p"],
        finish_reason=r["finish_reason"],
    )


def _top_version(traj: Trajectory) -> int | None:
    """The highest policy version of any traced turn (the row's `policy_version`), None without traces."""
    top: int | None = None
    for step in traj.steps:
        tr = step.trace
        if tr is not None:
            version = max(tr.policy_versions) if tr.policy_versions else tr.policy_version
            if top is None or version > top:
                top = version
    return top


def row_problem(
    r: Mapping[str, Any],
    traj: Trajectory,
    task_hash: str,
    texts: list[tuple[str, str, str]],
    traces: list[StoredTrace | None],
    stray_traces: int,
) -> str | None:
    """Why the rows of `traj` (its trajectory row `r` joined with its task, its step `texts` and
    `traces`) do not match its content, or None. `task_hash` is the sha256 of the stored task
    body; `stray_traces` counts token-trace rows that belong to none of its steps."""
    if r["n_steps"] != len(traj.steps):
        return f"its row says {r['n_steps']} steps but {len(traj.steps)} are stored"
    if stray_traces:
        return f"{stray_traces} of its token-trace rows belong to no stored step"
    if task_hash != r["task_hash"]:
        return f"its task's stored body no longer matches the task hash {str(r['task_hash'])[:12]}"
    task = traj.task
    if (r["task_id"], r["split"]) != (task.id, task.split):
        return f"its row's task and split ({r['task_id']}, {r['split']}) are not its task's ({task.id}, {task.split})"
    top = _top_version(traj)
    if r["policy_version"] != top:
        return f"its row's policy version {r['policy_version']} is not its token traces' ({top})"
    if traj.schema_version < 4:
        digest = content_hash(traj)
    else:
        digest = stored_content_hash(traj, task_hash, r["meta"], texts, traces)
    if digest != traj.content_hash:
        return "its stored rows no longer match its content hash"
    return None
