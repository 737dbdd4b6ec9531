"""One episode: observation -> policy -> action -> env.step, until the env ends it or a limit does.

Nothing that goes wrong inside an episode raises out of `run_episode`: a malformed
tool call is answered by the environment with an error observation, and a policy
or environment failure, a timeout or a limit ends the episode with a recorded
`termination` reason. The trajectory keeps every step taken before that.

The loop is on the hot path of every rollout, so it skips work that buys nothing
(see benchmarks/rollout_overhead.py):

* an env call that finishes without suspending (the usual case for in-process
  environments) runs without arming a timer, since none could fire while it runs;
  one that suspends is bounded by the same deadline as with `asyncio.wait_for`.
  The episode's own time limit works the same way;
* the sampling parameters are copied once per distinct token budget, not per turn,
  and not at all while the caller's `max_tokens` is the budget; the budget is
  recomputed only when a traced turn used tokens;
* a deadline reads `time.monotonic` directly when the loop's clock is that (asyncio's
  default loop), saving a Python call per step;
* during the episode each step is kept as a plain dict of its fields (the action
  message itself is validated at once, since the env and the policy get it); at the
  end the trajectory and all its steps are validated in one pydantic-core call, which
  costs less than building each record from Python. A step that does not validate
  ends the trajectory there with an env error, as if the episode had stopped at it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from math import isfinite
from types import CoroutineType
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, from_json, to_json

from safactory.policy.base import Policy, SamplingParams
from safactory.sim.env import Environment, EnvSpec
from safactory.types import Message, Step, Task, TokenTrace, ToolSpec, Trajectory

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
    traj, _ = await play_episode(
        env,
        policy,
        task,
        seed=seed,
        sampling=sampling,
        limits=limits,
        run_id=run_id,
        group_id=group_id,
        kind=kind,
        tags=tags,
        provenance=provenance,
        started=started,
    )
    return traj


class _Record:
    """What an episode has recorded so far; it becomes the validated Trajectory at the end."""

    __slots__ = ("prompt", "tools", "steps", "error", "success", "reset_error")

    def __init__(self) -> None:
        self.prompt: list[Message] = []
        self.tools: list[ToolSpec] = []
        self.steps: list[dict[str, Any]] = []  # the fields of each Step, validated with the trajectory
        self.error: str | None = None
        self.success = False
        self.reset_error: BaseException | None = None


async def play_episode(
    env: Environment,
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
    task_hash: str | None = None,
    started: float | None = None,
) -> tuple[Trajectory, BaseException | None]:
    """`run_episode` on an env already built; also returns what the env's `reset` raised, if it did.

    `task_hash` may be passed when the caller already has `task.hash()` (one per group);
    `started` is when the episode began (default: now). The env is closed on every way out.
    """
    if started is None:
        started = time.time()
    record = _Record()
    try:
        spec = env.spec
        if task_hash is None:
            task_hash = task.hash()
        # No timer unless the episode suspends: an episode that never waits cannot time out.
        termination = await bounded(_loop(env, policy, task, seed, sampling, limits, spec, record), limits.timeout_s)
    except TimeoutError:
        termination = "timeout"
        record.error = f"episode exceeded {limits.timeout_s} s"
    finally:
        try:
            await bounded(env.close(), limits.env_timeout_s)
        except Exception as exc:  # closing is best effort; the episode's data is already recorded
            tags = {**(tags or {}), "close_error": repr(exc)}
    data = {
        "run_id": run_id,
        "group_id": group_id,
        "kind": kind,
        "task": task,
        "task_hash": task_hash,
        "env_id": spec.id,
        "env_version": spec.version,
        "seed": seed,
        "prompt": record.prompt,
        "tools": record.tools,
        "steps": record.steps,
        "success": record.success,
        "termination": termination,
        "error": record.error,
        "provenance": provenance or {},
        "started_at": started,
        "duration_s": time.time() - started,
        "tags": tags or {},
    }
    try:
        traj = _validate_trajectory(data)  # the trajectory and all its steps, validated in one call
    except ValidationError:
        traj = _salvage(data)
    traj.reward = sum([s.reward or 0.0 for s in traj.steps])
    return traj, record.reset_error


def _salvage(data: dict[str, Any]) -> Trajectory:
    """The trajectory when a step does not validate (an env answered with malformed data).

    Recorded as if the episode had ended at that step with an env error, which is what
    validating the step right after the env answered would have recorded. Raises if no
    step is at fault (as building the trajectory up front would have).
    """
    steps = data["steps"]
    for i, step in enumerate(steps):
        try:
            Step.model_validate(step)
        except ValidationError as exc:
            error = f"env step failed: {exc!r}"
            failed = {"index": step["index"], "action": step["action"], "trace": step.get("trace"), "error": error}
            data = {**data, "steps": [*steps[:i], failed], "termination": "env_error", "error": error, "success": False}
            break
    return Trajectory.model_validate(data)


_validate_trajectory = Trajectory.__pydantic_validator__.validate_python
_validate_message = Message.__pydantic_validator__.validate_python


def storable_info(info: dict[str, Any]) -> dict[str, Any]:
    """A copy of an env's step `info` that the store can write as JSON.

    NumPy scalars and arrays (common in Gymnasium `info`) become plain numbers and lists;
    any other value JSON cannot hold raises ValueError, which ends the episode as an env error.
    """
    try:
        to_json(info)
        return dict(info)
    except PydanticSerializationError:
        pass
    try:
        text = to_json(info, fallback=_plain, inf_nan_mode="constants")
    except (PydanticSerializationError, TypeError) as exc:
        raise ValueError(f"the env's info cannot be stored as JSON: {exc}") from exc
    return from_json(text, allow_inf_nan=True)


def _plain(value: Any) -> Any:
    """NumPy values as Python ones; anything else is refused."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


async def _loop(
    env: Environment,
    policy: Policy,
    task: Task,
    seed: int,
    sampling: SamplingParams,
    limits: EpisodeLimits,
    spec: EnvSpec,
    record: _Record,
) -> str:
    env_timeout_s = limits.env_timeout_s
    try:
        obs = await bounded(env.reset(task, seed), env_timeout_s)
    except Exception as exc:
        record.reset_error = exc
        record.error = f"reset failed: {exc!r}"
        return "env_error"
    record.prompt = list(obs.messages)
    record.tools = list(obs.tools)
    messages: list[Message] = list(obs.messages)
    tools = obs.tools
    steps = record.steps
    generate, env_step = policy.generate, env.step
    loop = asyncio.get_running_loop()  # deadlines are on its clock; the default loop's is time.monotonic
    clock = time.monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time
    max_turns = min(limits.max_turns, spec.max_turns)
    per_turn, total = limits.max_tokens_per_turn, limits.max_total_tokens
    tokens_used = 0
    turn_budget = min(per_turn, total)  # changes only when tokens_used does
    params, budget = sampling, None  # params: `sampling` with max_tokens = budget
    for turn in range(max_turns):
        if turn_budget != budget:  # one copy per distinct budget, not one per turn
            if turn_budget <= 0:
                return "token_limit"
            params, budget = sampling, turn_budget  # the caller's own when they say max_tokens = budget already
            if sampling.max_tokens != budget:
                params = sampling.model_copy(update={"max_tokens": budget})
        try:
            completion = await generate(messages, tools, params)
        except Exception as exc:
            record.error = f"policy failed: {exc!r}"
            return "policy_error"
        try:  # a policy's reply is input too: one that does not validate ends the episode, recorded
            action = _validate_message(
                {"role": "assistant", "content": completion.text, "tool_calls": completion.tool_calls}
            )
            trace = None
            if (token_ids := completion.token_ids) is not None:  # the token budget counts every sampled id
                tokens_used += len(token_ids)
                turn_budget = min(per_turn, total - tokens_used)
                if completion.prompt_ids is not None:
                    trace = TokenTrace(
                        prompt_ids=completion.prompt_ids,
                        completion_ids=token_ids,
                        logprobs=completion.logprobs,
                        policy_version=completion.policy_version,
                        policy_versions=completion.policy_versions or [completion.policy_version],
                        temperature=completion.temperature,
                        top_p=completion.top_p,
                        finish_reason=completion.finish_reason,
                    )
        except Exception as exc:
            record.error = f"policy returned an invalid completion: {exc!r}"
            return "policy_error"
        messages.append(action)
        # The step's fields are kept as a dict and validated with the trajectory at the end
        # (copies of the env's list and dict, so that later changes to them do not leak in).
        try:
            call = env_step(action)
            if type(call) is CoroutineType:  # bounded() inlined: this runs once per step
                deadline = clock() + env_timeout_s
                try:
                    result = await _finish_by(call, call.send(None), deadline)
                except StopIteration as stop:
                    result = stop.value
            else:
                result = await asyncio.wait_for(call, env_timeout_s)
            observation = list(result.messages)
            if (reward := result.reward) is not None and not isfinite(reward):
                raise ValueError(f"the env answered with a non-finite reward ({reward})")
            step = {"index": turn, "action": action, "observation": observation, "reward": reward}
            if (info := result.info) != {}:  # fields at their defaults are left to the validation
                step["info"] = storable_info(info)
            if trace is not None:
                step["trace"] = trace
            if completion.parse_error is not None:
                step["error"] = completion.parse_error
            steps.append(step)
        except TimeoutError as exc:
            record.error = f"env step timed out: {exc!r}"
            steps.append({"index": turn, "action": action, "trace": trace, "error": record.error})
            return "env_timeout"
        except Exception as exc:
            record.error = f"env step failed: {exc!r}"
            steps.append({"index": turn, "action": action, "trace": trace, "error": record.error})
            return "env_error"
        except BaseException:  # cancelled, or the episode's own timeout: keep the action taken
            steps.append({"index": turn, "action": action, "trace": trace, "error": completion.parse_error})
            raise
        messages.extend(observation)
        if result.terminated:
            record.success = bool(result.info.get("success", (result.reward or 0.0) > 0))
            return "terminated"
        if result.truncated:  # cut short, which counts as success only where the env says so
            record.success = bool(result.info.get("success", False))
            return "truncated"
    return "max_turns"
