"""One episode: observation -> policy -> action -> env.step, until the env ends it or a limit does.

Nothing that goes wrong inside an episode raises out of `run_episode`: a malformed
tool call is answered by the environment with an error observation, and a policy
or environment failure, a timeout or a limit ends the episode with a recorded
`termination` reason. The trajectory keeps every step taken before that.

The loop is on the hot path of every rollout, so it skips per-step work that buys
nothing (see benchmarks/rollout_overhead.py):

* an env call that finishes without suspending (the usual case for in-process
  environments) runs without arming a timer, since none could fire while it runs;
  one that suspends is bounded by the same deadline as with `asyncio.wait_for`;
* the sampling parameters are copied once per distinct token budget, not per turn;
* each step is one validated record, built once the environment has answered,
  rather than a record plus field assignments.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from types import CoroutineType
from typing import Any, TypeVar

from safactory.policy.base import Policy, SamplingParams
from safactory.sim.env import Environment
from safactory.types import Message, Step, Task, TokenTrace, Trajectory

_T = TypeVar("_T")


@dataclass(frozen=True)
class EpisodeLimits:
    """Per-episode limits. `max_turns` is further capped by the env's own spec."""

    max_turns: int = 4
    max_tokens_per_turn: int = 48
    max_total_tokens: int = 2048
    timeout_s: float = 120.0
    env_timeout_s: float = 30.0


# ---- bounded awaiting without a timer when nothing waits ---------------------------------


class _Resume:
    """Awaits the rest of a coroutine that was already started and has yielded `first`.

    This is `yield from coro` for a coroutine whose first step already ran: values
    sent and exceptions thrown in by the event loop (cancellation included) are
    passed on, and the coroutine's return value is the result.
    """

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _finish_by(coro: Coroutine[Any, Any, _T], pending: Any, deadline: float | None) -> _T:
    """The rest of a started coroutine, under a deadline (TimeoutError once it passes)."""
    async with asyncio.timeout_at(deadline):
        return await _Resume(coro, pending)


async def bounded(call: Awaitable[_T], timeout_s: float | None) -> _T:
    """Await `call` with a timeout, like `asyncio.wait_for`, without its cost when no wait happens.

    A coroutine runs in the calling task up to its first suspension; if it returns
    before suspending, no timer was needed. If it suspends, the rest is awaited under
    a deadline measured from the call, so a call that takes too long raises
    TimeoutError. Any other awaitable goes through `asyncio.wait_for`.
    """
    if type(call) is not CoroutineType:
        return await asyncio.wait_for(call, timeout_s)
    deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
    try:
        pending = call.send(None)
    except StopIteration as stop:
        return stop.value
    return await _finish_by(call, pending, deadline)


# ---- the episode -----------------------------------------------------------------------------


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
            await bounded(env.close(), limits.env_timeout_s)
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
    env_timeout_s = limits.env_timeout_s
    try:
        obs = await bounded(env.reset(task, seed), env_timeout_s)
    except Exception as exc:
        traj.error = f"reset failed: {exc!r}"
        return "env_error"
    traj.prompt = list(obs.messages)
    traj.tools = list(obs.tools)
    messages: list[Message] = list(obs.messages)
    tools = obs.tools
    steps = traj.steps
    clock = asyncio.get_running_loop().time
    max_turns = min(limits.max_turns, env.spec.max_turns)
    tokens_used = 0
    by_budget: dict[int, SamplingParams] = {}  # one copy per distinct token budget, not one per turn
    for turn in range(max_turns):
        budget = min(limits.max_tokens_per_turn, limits.max_total_tokens - tokens_used)
        if budget <= 0:
            return "token_limit"
        params = by_budget.get(budget)
        if params is None:
            params = by_budget[budget] = sampling.model_copy(update={"max_tokens": budget})
        try:
            completion = await policy.generate(messages, tools, params)
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
                policy_versions=completion.policy_versions or [completion.policy_version],
                temperature=completion.temperature,
                top_p=completion.top_p,
                finish_reason=completion.finish_reason,
            )
        messages.append(action)
        # The step is recorded once the env has answered (one record instead of a record and
        # field assignments); every other way out of the env call records it too.
        try:
            call = env.step(action)
            if type(call) is CoroutineType:  # bounded() inlined: this runs once per step
                deadline = clock() + env_timeout_s
                try:
                    result = await _finish_by(call, call.send(None), deadline)
                except StopIteration as stop:
                    result = stop.value
            else:
                result = await asyncio.wait_for(call, env_timeout_s)
            step = Step(
                index=turn,
                action=action,
                observation=result.messages,
                reward=result.reward,
                info=result.info,
                trace=trace,
                error=completion.parse_error,
            )
        except TimeoutError as exc:
            traj.error = f"env step timed out: {exc!r}"
            steps.append(Step(index=turn, action=action, trace=trace, error=traj.error))
            return "env_timeout"
        except Exception as exc:
            traj.error = f"env step failed: {exc!r}"
            steps.append(Step(index=turn, action=action, trace=trace, error=traj.error))
            return "env_error"
        except BaseException:  # cancelled, or the episode's own timeout: keep the action taken
            steps.append(Step(index=turn, action=action, trace=trace, error=completion.parse_error))
            raise
        steps.append(step)
        messages.extend(result.messages)
        if result.terminated:
            traj.success = bool(result.info.get("success", (result.reward or 0.0) > 0))
            return "terminated"
        if result.truncated:
            return "truncated"
    return "max_turns"
