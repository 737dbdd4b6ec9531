"""Shared records of Safactory: the one place every platform takes its data shapes from.

Messages and tools follow the OpenAI chat format. A trajectory carries, per
assistant turn, the exact token ids the policy saw and sampled, their behaviour
log-probs and the policy version, so training never re-tokenises text.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

SCHEMA_VERSION = 4
"""Version of the trajectory record and of the store layout. 4: content hashes over the
canonical encoding of `safactory.data.codec.encode_trajectory`, row texts written by pydantic-core;
trajectories recorded as version 3 keep their sorted-key JSON hash (`safactory.data.codec.content_hash`)."""

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
