"""The Policy protocol: chat messages and tools in, one completion out.

A completion from a model carries the exact token ids it was conditioned on and
sampled, the behaviour log-prob of each sampled token and the policy version, so
the trainer can learn from exactly what happened.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pydantic import BaseModel, Field

from safactory.types import Message, ToolCall, ToolSpec


class SamplingParams(BaseModel):
    """How to sample. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: list[str] = Field(default_factory=list)


class Completion(BaseModel):
    """One assistant turn produced by a policy.

    `policy_version` is the version that produced the first token. A request in
    flight while new weights were swapped in samples its later tokens with the new
    weights; `policy_versions` lists every version the completion touched, in order
    (one entry unless a swap fell inside it; empty from policies that do not say).
    """

    text: str
    tool_calls: list[ToolCall] = Field(default_factory=list)
    parse_error: str | None = None
    prompt_ids: list[int] | None = None
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    policy_version: int = 0
    policy_versions: list[int] = Field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    finish_reason: str = "stop"


class PolicyError(RuntimeError):
    """A policy could not produce a completion (prompt too long, backend down, ...)."""


@runtime_checkable
class Policy(Protocol):
    async def generate(
        self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams
    ) -> Completion: ...
