"""One episode: observation -> policy -> action -> env.step, until the env ends it or a limit does.

Nothing that goes wrong inside an episode raises out of `run_episode`: a malformed
tool call is answered by the environment with an error observation, and a policy
or environment failure, a timeout or a limit ends the episode with a recorded
`termination` reason. The trajectory keeps every step taken before that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from safactory.policy.base import Policy, SamplingParams
from safactory.sim.env import Environment
from safactory.types import Message, Step, Task, TokenTrace, Trajectory


@dataclass(frozen=True)
class EpisodeLimits:
    """Per-episode limits. `max_turns` is further capped by the env's own spec."""

    max_turns: int = 4
    max_tokens_per_turn: int = 48
    max_total_tokens: int = 2048
    timeout_s: float = 120.0
    env_timeout_s: float = 30.0


async def run_episode(
    env_factory: Callable[[], Environment],
    policy: Policy,
    task: Task,
    *,
    seed: int,
    sampling: SamplingParams,
    limits: EpisodeLimits,
    run_id: str = "",
    group_id: str = "",
    kind: str = "rollout",
    tags: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Trajectory:
    """Run one episode and return its trajectory (never raises for episode-level failures)."""
    started = time.time()
    env = env_factory()
    traj = Trajectory(
        run_id=run_id,
        group_id=group_id,
        kind=kind,
        task=task,
        task_hash=task.hash(),
        env_id=env.spec.id,
        env_version=env.spec.version,
        seed=seed,
        started_at=started,
        tags=dict(tags or {}),
        provenance=dict(provenance or {}),
    )
    try:
        async with asyncio.timeout(limits.timeout_s):
            traj.termination = await _loop(env, policy, task, seed, sampling, limits, traj)
    except TimeoutError:
        traj.termination = "timeout"
        traj.error = f"episode exceeded {limits.timeout_s} s"
    finally:
        try:
            await asyncio.wait_for(env.close(), limits.env_timeout_s)
        except Exception as exc:  # closing is best effort; the episode's data is already recorded
            traj.tags["close_error"] = repr(exc)
    traj.duration_s = time.time() - started
    traj.reward = sum(s.reward or 0.0 for s in traj.steps)
    return traj


async def _loop(
    env: Environment,
    policy: Policy,
    task: Task,
    seed: int,
    sampling: SamplingParams,
    limits: EpisodeLimits,
    traj: Trajectory,
) -> str:
    try:
        obs = await asyncio.wait_for(env.reset(task, seed), limits.env_timeout_s)
    except Exception as exc:
        traj.error = f"reset failed: {exc!r}"
        return "env_error"
    traj.prompt = list(obs.messages)
    traj.tools = list(obs.tools)
    messages: list[Message] = list(obs.messages)
    max_turns = min(limits.max_turns, env.spec.max_turns)
    tokens_used = 0
    for turn in range(max_turns):
        budget = min(limits.max_tokens_per_turn, limits.max_total_tokens - tokens_used)
        if budget <= 0:
            return "token_limit"
        try:
            completion = await policy.generate(messages, obs.tools, sampling.model_copy(update={"max_tokens": budget}))
        except Exception as exc:
            traj.error = f"policy failed: {exc!r}"
            return "policy_error"
        action = Message(role="assistant", content=completion.text, tool_calls=completion.tool_calls)
        trace = None
        if completion.token_ids is not None and completion.prompt_ids is not None:
            tokens_used += len(completion.token_ids)
            trace = TokenTrace(
                prompt_ids=completion.prompt_ids,
                completion_ids=completion.token_ids,
                logprobs=completion.logprobs,
                policy_version=completion.policy_version,
                temperature=completion.temperature,
                top_p=completion.top_p,
                finish_reason=completion.finish_reason,
            )
        step = Step(index=turn, action=action, trace=trace, error=completion.parse_error)
        traj.steps.append(step)
        messages.append(action)
        try:
            result = await asyncio.wait_for(env.step(action), limits.env_timeout_s)
        except TimeoutError as exc:
            step.error = traj.error = f"env step timed out: {exc!r}"
            return "env_timeout"
        except Exception as exc:
            step.error = traj.error = f"env step failed: {exc!r}"
            return "env_error"
        step.observation = list(result.messages)
        step.reward = result.reward
        step.info = dict(result.info)
        messages.extend(result.messages)
        if result.terminated:
            traj.success = bool(result.info.get("success", (result.reward or 0.0) > 0))
            return "terminated"
        if result.truncated:
            return "truncated"
    return "max_turns"
