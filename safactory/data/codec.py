"""The canonical byte encoding of a trajectory (schema version 4) and its content hash.

`encode_trajectory` turns a trajectory into the texts and blobs the store writes into its
rows and hashes them; `content_hash` is the integrity hash every stored trajectory carries
(trajectories recorded as version 3 keep their sorted-key JSON hash); `stored_content_hash`
takes the same hash over the texts and blobs read back from the rows, without re-serialising.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, NamedTuple

import numpy as np
from pydantic import TypeAdapter
from pydantic_core import to_json

from safactory.types import Message, Trajectory, canonical_json, sha256_hex


def content_hash(traj: Trajectory) -> str:
    """sha256 over the canonical encoding of everything except the hash fields themselves.

    Version 4 and later: `encode_trajectory` (the store writes the very same texts and
    blobs). Trajectories recorded as version 3 keep their original form, sorted-key JSON
    of the whole record, so their hashes still verify.
    """
    if traj.schema_version < 4:
        return sha256_hex(canonical_json(traj.model_dump(exclude={"content_hash", "prev_hash"})))
    return encode_trajectory(traj, traj.task.hash()).content_hash


CANONICAL_TAG = b"safactory-trajectory-4\n"
META_FIELDS = {"schema_version", "prompt", "tools", "provenance", "started_at", "duration_s", "tags"}

_trajectory_json = Trajectory.__pydantic_serializer__.to_json
_message_json = Message.__pydantic_serializer__.to_json
_messages_json = TypeAdapter(list[Message]).serializer.to_json
_pack = struct.pack


def _shared_prefix(previous: list[int], prompt: list[int]) -> int:
    """How many leading ids `prompt` shares with `previous`."""
    n = min(len(previous), len(prompt))
    if n == 0 or prompt[:n] == previous[:n]:
        return n
    return int(np.nonzero(np.asarray(previous[:n]) != np.asarray(prompt[:n]))[0][0])


EncodedTrace = tuple[int, list[int], float, float, str, int, bytes, bytes, bytes | None]
"""(policy_version, policy_versions, temperature, top_p, finish_reason, prefix_len,
prompt suffix ids, completion ids, log-probs): the ids as little-endian int32, the
log-probs as little-endian float32 (None when the trace has none)."""


EncodedStep = tuple[int, float | None, str | None, bytes, bytes, bytes, EncodedTrace | None]
"""(index, reward, error, action JSON, observation JSON, info JSON, trace or None)."""


class EncodedTrajectory(NamedTuple):
    """What `encode_trajectory` hashed: the texts and blobs the store writes into its rows."""

    content_hash: str
    meta: bytes  # JSON object of META_FIELDS
    steps: list[EncodedStep]


def encode_trajectory(traj: Trajectory, task_hash: str) -> EncodedTrajectory:
    r"""The canonical encoding of a trajectory (schema version 4): its sha256 and its parts.

    The store writes these very texts and blobs into its rows, so each part is serialised
    once, and hashed as it is stored. `task_hash` must be `traj.task.hash()`, the sha256 of
    the task's sorted-key canonical JSON (the tasks table stores that JSON, keyed by it).

    A turn's prompt usually extends the previous turn's prompt + completion, so a trace
    keeps only its prompt ids past `prefix_len`, the number of leading ids the prompt shares
    with the previous traced turn's prompt + completion (0 on the first traced turn): the
    full prompt is `previous[:prefix_len] + suffix`, a function of the content alone.

    The content hash is the sha256 of the concatenation of

        b"safactory-trajectory-4\n"
        scalars JSON, b"\n"   [task_hash, the task_hash field, id, run_id, group_id, kind,
                              env_id, env_version, seed, reward, success, termination, error,
                              [[index, reward, error, trace] per step]], trace being null or
                              [policy_version, policy_versions, temperature, top_p,
                              finish_reason, prefix_len, #suffix ids, #completion ids,
                              #log-probs or null]
        meta JSON, b"\n"      {schema_version, prompt, tools, provenance, started_at,
                              duration_s, tags}
        per step              action JSON, b"\n", observation JSON, b"\n", info JSON, b"\n"
        per traced step       prompt suffix ids, completion ids (int32 LE), log-probs (float32 LE)

    Every JSON text is pydantic-core's: no whitespace, model fields in declaration order,
    free-form dicts (`info`, `arguments`, `parameters`, `provenance`, `tags`) in their own
    key order (the store keeps it, and it is content: a tool's parameter order, say), floats
    in shortest round-trip form, non-ASCII unescaped, non-finite floats as null except inside
    `info` (NaN, Infinity, as stored), and the scalars' floats with -0.0 as 0.0 (SQLite stores
    a REAL -0.0 as 0.0). No JSON text holds a raw newline and the scalars give
    every blob's length, so the encoding is unambiguous.
    """
    step_scalars: list[tuple[Any, ...]] = []
    parts: list[EncodedStep] = []
    chunks: list[bytes] = [CANONICAL_TAG, b"", b"\n", b"", b"\n"]  # scalars and meta go in at the end
    blobs: list[bytes] = []
    previous: list[int] | None = None
    for step in traj.steps:
        action = _message_json(step.action)
        observation = _messages_json(step.observation) if step.observation else b"[]"
        info = to_json(step.info) if step.info else b"{}"
        chunks += (action, b"\n", observation, b"\n", info, b"\n")
        tr = step.trace
        index, reward, error = step.index, step.reward, step.error
        if reward is not None:
            reward += 0.0  # -0.0 -> 0.0: SQLite reads a stored -0.0 back as 0.0
        if tr is None:
            step_scalars.append((index, reward, error, None))
            parts.append((index, reward, error, action, observation, info, None))
            continue
        prompt = tr.prompt_ids
        completion = tr.completion_ids
        logprobs = tr.logprobs
        if previous is None:
            prefix, suffix = 0, prompt
        else:
            prefix = len(previous)
            if prompt[:prefix] != previous:
                prefix = _shared_prefix(previous, prompt)
            suffix = prompt[prefix:]
        n_suffix, n_completion = len(suffix), len(completion)
        suffix_blob = _pack(f"<{n_suffix}i", *suffix)
        completion_blob = _pack(f"<{n_completion}i", *completion)
        if logprobs is None:
            n_logprobs = logprobs_blob = None
            blobs += (suffix_blob, completion_blob)
        else:
            n_logprobs = len(logprobs)
            logprobs_blob = _pack(f"<{n_logprobs}f", *logprobs)
            blobs += (suffix_blob, completion_blob, logprobs_blob)
        version, versions, temperature, top_p, finish = (
            tr.policy_version,
            tr.policy_versions,
            tr.temperature + 0.0,
            tr.top_p + 0.0,
            tr.finish_reason,
        )
        counts = (prefix, n_suffix, n_completion, n_logprobs)
        step_scalars.append((index, reward, error, (version, versions, temperature, top_p, finish, *counts)))
        trace = (version, versions, temperature, top_p, finish, prefix, suffix_blob, completion_blob, logprobs_blob)
        parts.append((index, reward, error, action, observation, info, trace))
        previous = prompt + completion
    chunks[1] = _scalars_json(traj, task_hash, step_scalars)
    chunks[3] = meta = _trajectory_json(traj, include=META_FIELDS)
    chunks += blobs
    return EncodedTrajectory(hashlib.sha256(b"".join(chunks)).hexdigest(), meta, parts)


def _scalars_json(traj: Trajectory, task_hash: str, step_scalars: list[tuple[Any, ...]]) -> bytes:
    return to_json(
        (
            task_hash,
            traj.task_hash,
            traj.id,
            traj.run_id,
            traj.group_id,
            traj.kind,
            traj.env_id,
            traj.env_version,
            traj.seed,
            traj.reward + 0.0,
            traj.success,
            traj.termination,
            traj.error,
            step_scalars,
        ),
        inf_nan_mode="null",
    )


StoredTrace = tuple[int, bytes, bytes, bytes | None]
"""A token-trace row's prefix_len and its blobs: prompt suffix ids, completion ids, log-probs or None."""


def stored_content_hash(
    traj: Trajectory, task_hash: str, meta: str, texts: list[tuple[str, str, str]], traces: list[StoredTrace | None]
) -> str:
    """The version-4 content hash of a trajectory read back from its rows, taken over the very texts
    and blobs the rows hold (no re-serialisation): `task_hash` is the sha256 of the stored task body,
    `meta` the row's meta text, `texts` each step's (action, observation, info) texts and `traces`
    each step's stored trace (None for a step without one). The scalars come from `traj`, the
    record a reader gets. Equals `encode_trajectory(traj, task_hash).content_hash` for rows the
    store wrote; any edit of a row, a step or a trace changes it."""
    chunks: list[bytes] = [CANONICAL_TAG, b"", b"\n", meta.encode(), b"\n"]
    blobs: list[bytes] = []
    step_scalars: list[tuple[Any, ...]] = []
    for step, (action, observation, info), stored in zip(traj.steps, texts, traces, strict=True):
        chunks += (action.encode(), b"\n", observation.encode(), b"\n", info.encode(), b"\n")
        reward = step.reward if step.reward is None else step.reward + 0.0
        tr = step.trace
        if stored is None or tr is None:
            step_scalars.append((step.index, reward, step.error, None))
            continue
        prefix, suffix, completion, logprobs = stored
        blobs += (suffix, completion) if logprobs is None else (suffix, completion, logprobs)
        counts = (prefix, len(suffix) // 4, len(completion) // 4, None if logprobs is None else len(logprobs) // 4)
        head = (tr.policy_version, tr.policy_versions, tr.temperature + 0.0, tr.top_p + 0.0, tr.finish_reason)
        step_scalars.append((step.index, reward, step.error, (*head, *counts)))
    chunks[1] = _scalars_json(traj, task_hash, step_scalars)
    return hashlib.sha256(b"".join(chunks + blobs)).hexdigest()
