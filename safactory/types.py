"""Shared records of Safactory: the one place every platform takes its data shapes from.

Messages and tools follow the OpenAI chat format. A trajectory carries, per
assistant turn, the exact token ids the policy saw and sampled, their behaviour
log-probs and the policy version, so training never re-tokenises text.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, Field, TypeAdapter, field_validator
from pydantic_core import to_json

SCHEMA_VERSION = 4
"""Version of the trajectory record and of the store layout. 4: content hashes over the
canonical encoding of `encode_trajectory`, row texts written by pydantic-core; trajectories
recorded as version 3 keep their sorted-key JSON hash (`Trajectory.compute_hash`)."""

Role = Literal["system", "user", "assistant", "tool"]


_UUID7_BITS = (0x7 << 76) | (0b10 << 62)  # version 7, RFC 9562 variant
_MASK_48 = (1 << 48) - 1
_MASK_62 = (1 << 62) - 1


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 version 7) as a string (the text of `str(uuid.UUID(int=...))`).

    Formatted directly: one is made per trajectory and per group, on the rollout hot path.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & _MASK_48) << 80 | ((rand >> 62) & 0xFFF) << 64 | rand & _MASK_62 | _UUID7_BITS
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace (NaN and infinities refused): the form config,
    task and other small hashes are taken over. Same text as `json.dumps` with those options."""
    return _CANONICAL.encode(obj)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ToolCall(BaseModel):
    """One call of a tool by the assistant."""

    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Message(BaseModel):
    """One chat message in the OpenAI format."""

    role: Role
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None


class ToolSpec(BaseModel):
    """A tool the environment offers: JSON Schema parameters plus MCP-style hints."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    read_only: bool = False
    destructive: bool = False

    def param_names(self) -> list[str]:
        """Parameter names, required ones first, in declaration order."""
        props = list(self.parameters.get("properties", {}))
        required = [p for p in self.parameters.get("required", []) if p in props]
        return required + [p for p in props if p not in required]


class Task(BaseModel):
    """One task of an environment. `data` is private to the environment (e.g. the answer)."""

    id: str
    env_id: str
    split: str
    prompt: str
    data: dict[str, Any] = Field(default_factory=dict)

    def hash(self) -> str:
        return sha256_hex(canonical_json(self.model_dump()))


class Observation(BaseModel):
    """What the agent sees after reset: the opening messages and the tools on offer."""

    messages: list[Message]
    tools: list[ToolSpec] = Field(default_factory=list)
    info: dict[str, Any] = Field(default_factory=dict)


class StepResult(BaseModel):
    """What the environment answers to one assistant action."""

    messages: list[Message] = Field(default_factory=list)
    reward: float | None = None
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = Field(default_factory=dict)


class TokenTrace(BaseModel):
    """Exact tokens of one assistant turn.

    `prompt_ids` is what the policy was conditioned on, `completion_ids` what it
    sampled, `logprobs` the behaviour log-prob of each sampled token under the
    distribution actually sampled from (logits divided by `temperature`).
    `policy_version` is the version that sampled the first token; `policy_versions`
    lists every version the turn touched (several when weights were swapped mid-turn).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float] | None = None
    policy_version: int = 0
    policy_versions: list[int] = Field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    finish_reason: str = "stop"

    @field_validator("logprobs")
    @classmethod
    def _as_float32(cls, value: list[float] | None) -> list[float] | None:
        """Log-probs are kept at float32 precision, as stored, so hashes survive a round trip."""
        if value is None:
            return None
        return np.asarray(value, dtype=np.float32).astype(np.float64).tolist()


class Step(BaseModel):
    """One turn of an episode: the action, the environment's answer and the tokens behind it."""

    index: int
    action: Message
    observation: list[Message] = Field(default_factory=list)
    reward: float | None = None
    info: dict[str, Any] = Field(default_factory=dict)
    trace: TokenTrace | None = None
    error: str | None = None


class Trajectory(BaseModel):
    """One episode, with provenance and an integrity hash."""

    schema_version: int = SCHEMA_VERSION
    id: str = Field(default_factory=uuid7)
    run_id: str = ""
    group_id: str = ""
    kind: str = "rollout"
    task: Task
    task_hash: str = ""
    env_id: str = ""
    env_version: str = ""
    seed: int = 0
    prompt: list[Message] = Field(default_factory=list)
    tools: list[ToolSpec] = Field(default_factory=list)
    steps: list[Step] = Field(default_factory=list)
    reward: float = 0.0
    success: bool = False
    termination: str = ""
    error: str | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    started_at: float = 0.0
    duration_s: float = 0.0
    tags: dict[str, Any] = Field(default_factory=dict)
    content_hash: str = ""
    prev_hash: str = ""

    def policy_versions(self) -> list[int]:
        """Every policy version that sampled a token of this episode, ascending."""
        traces = [s.trace for s in self.steps if s.trace is not None]
        return sorted({v for tr in traces for v in (tr.policy_versions or [tr.policy_version])})

    def messages(self) -> list[Message]:
        """The whole conversation: opening messages, then each action and its observation."""
        out = list(self.prompt)
        for step in self.steps:
            out.append(step.action)
            out.extend(step.observation)
        return out

    def compute_hash(self) -> str:
        """sha256 over the canonical encoding of everything except the hash fields themselves.

        Version 4 and later: `encode_trajectory` (the store writes the very same texts and
        blobs). Trajectories recorded as version 3 keep their original form, sorted-key JSON
        of the whole record, so their hashes still verify.
        """
        if self.schema_version < 4:
            return sha256_hex(canonical_json(self.model_dump(exclude={"content_hash", "prev_hash"})))
        return encode_trajectory(self, self.task.hash()).content_hash


# ---- canonical encoding of a trajectory (schema version 4) ----------------------------

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
    chunks[1] = to_json(
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
    chunks[3] = meta = _trajectory_json(traj, include=META_FIELDS)
    chunks += blobs
    return EncodedTrajectory(hashlib.sha256(b"".join(chunks)).hexdigest(), meta, parts)
