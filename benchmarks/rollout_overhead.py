"""Benchmark: per-step overhead of the agent loop and runner against a bare asyncio loop.

A null policy answers every turn instantly with the same valid action; a trivial
environment answers every step at once (one small tool message, like the cheapest
real tool env) and terminates after K steps. The runner drives E such episodes
through `RolloutRunner.stream`; the baseline is a bare asyncio loop that resets
the same environment and calls `env.step` directly the same number of times, in the
same process and run. Both are timed in CPU time of this process (`time.process_time`),
so other work on a shared machine does not skew the ratio. The headline is `ratio=<runner steps/s / bare steps/s>` (1.0
would mean the runner costs nothing on top of the environment; target >= 0.5).

`--floor` also times the least that any loop keeping validated records must do (the
two records per step, the trajectory per episode, nothing else) against the same
baseline, as `floor_ratio`: the ceiling for `ratio` while both records are validated.

Run: `.venv/bin/python benchmarks/rollout_overhead.py [--episodes E] [--steps K] [--repeats R] [--profile] [--floor]`
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import statistics
import time

from safactory.policy.base import Completion, SamplingParams
from safactory.sim.agent import EpisodeLimits
from safactory.sim.env import EnvSpec
from safactory.sim.runner import Admission, RolloutRunner
from safactory.types import Message, Observation, StepResult, Task, ToolCall, ToolSpec, Trajectory

NOOP = ToolSpec(name="noop", description="Does nothing.")
SPEC = EnvSpec(id="trivial", version="1", tools=(NOOP,), max_turns=1_000_000)
ACTION = Message(role="assistant", content="noop()", tool_calls=[ToolCall(id="c", name="noop")])


class TrivialEnv:
    """Answers every step at once with one tool message; terminates after `k` steps."""

    spec = SPEC
    k = 16

    def __init__(self) -> None:
        self.turn = 0

    async def reset(self, task: Task, seed: int) -> Observation:
        self.turn = 0
        return Observation(messages=[Message(role="user", content=task.prompt)], tools=[NOOP])

    async def step(self, action: Message) -> StepResult:
        self.turn += 1
        done = self.turn >= self.k
        reply = Message(role="tool", content="ok", tool_call_id="c", name="noop")
        return StepResult(messages=[reply], reward=1.0 if done else 0.0, terminated=done)

    async def close(self) -> None:
        return None


class NullPolicy:
    """Returns the same valid action instantly."""

    def __init__(self) -> None:
        self.completion = Completion(text=ACTION.content, tool_calls=ACTION.tool_calls)

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        return self.completion


def make_tasks(n: int) -> list[Task]:
    return [Task(id=f"trivial/{i}", env_id="trivial", split="test", prompt=f"go {i}") for i in range(n)]


async def runner_steps(tasks: list[Task], k: int, concurrency: int) -> tuple[int, float]:
    """Steps taken and CPU seconds for the episodes run by `RolloutRunner.stream`.

    Finished groups go to a sink that counts and drops them, as a sink that stores them
    does (retaining every trajectory until the end would add CPython garbage-collector
    work that grows with the number of live objects, which is the caller's choice).
    """
    runner = RolloutRunner(
        TrivialEnv, NullPolicy(), limits=EpisodeLimits(max_turns=k), concurrency=concurrency, run_id="bench"
    )
    counted = {"steps": 0, "episodes": 0, "terminated": 0}

    async def sink(group: list[Trajectory]) -> None:
        for traj in group:
            counted["steps"] += len(traj.steps)
            counted["episodes"] += 1
            counted["terminated"] += traj.termination == "terminated"

    admission = Admission(groups_per_batch=len(tasks), eta=0, version=lambda: 0)  # never holds a group back
    start = time.process_time()
    await runner.stream(iter(tasks), 1, SamplingParams(), admission, sink)
    elapsed = time.process_time() - start
    steps = counted["steps"]
    assert steps == len(tasks) * k, f"expected {len(tasks) * k} steps, got {steps}"
    assert counted["terminated"] == counted["episodes"] == len(tasks)
    return steps, elapsed


async def bare_steps(tasks: list[Task], k: int) -> tuple[int, float]:
    start = time.process_time()
    steps = 0
    for task in tasks:
        env = TrivialEnv()
        await env.reset(task, 0)
        for _ in range(k):
            result = await env.step(ACTION)
            steps += 1
        assert result.terminated
        await env.close()
    return steps, time.process_time() - start


async def floor_steps(tasks: list[Task], k: int) -> tuple[int, float]:
    """Steps and CPU seconds of a stripped episode loop: only the validated records.

    Per step the assistant `Message` and the `Step`, per episode one `Trajectory` (steps
    validated with it, as the agent does); no ids, task hash, seeds, timeouts, copies,
    error handling or concurrency.
    """
    message = Message.__pydantic_validator__.validate_python
    trajectory = Trajectory.__pydantic_validator__.validate_python
    policy = NullPolicy()
    sampling = SamplingParams()
    start = time.process_time()
    steps = 0
    for task in tasks:
        env = TrivialEnv()
        obs = await env.reset(task, 0)
        messages, records = list(obs.messages), []
        for turn in range(k):
            completion = await policy.generate(messages, obs.tools, sampling)
            action = message({"role": "assistant", "content": completion.text, "tool_calls": completion.tool_calls})
            messages.append(action)
            result = await env.step(action)
            records.append({"index": turn, "action": action, "observation": result.messages, "reward": result.reward})
            messages.extend(result.messages)
            steps += 1
        await env.close()
        trajectory({"task": task, "prompt": obs.messages, "tools": obs.tools, "steps": records})
    return steps, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=16, help="K: steps per episode")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one runner pass and print the top entries")
    parser.add_argument("--floor", action="store_true", help="also time the stripped loop (floor_ratio)")
    args = parser.parse_args()
    TrivialEnv.k = args.steps
    tasks = make_tasks(args.episodes)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(runner_steps(tasks, args.steps, args.concurrency))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    runner_rates: list[float] = []
    bare_rates: list[float] = []
    floor_rates: list[float] = []
    asyncio.run(runner_steps(tasks[:100], args.steps, args.concurrency))  # warm up imports and caches
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        gc.collect()
        steps, elapsed = asyncio.run(runner_steps(tasks, args.steps, args.concurrency))
        runner_rates.append(steps / elapsed)
        gc.collect()
        steps, elapsed = asyncio.run(bare_steps(tasks, args.steps))
        bare_rates.append(steps / elapsed)
        if args.floor:
            gc.collect()
            steps, elapsed = asyncio.run(floor_steps(tasks, args.steps))
            floor_rates.append(steps / elapsed)
    runner_rate = statistics.median(runner_rates)
    bare_rate = statistics.median(bare_rates)
    shape = f"episodes={args.episodes} steps_per_episode={args.steps} concurrency={args.concurrency}"
    print(f"{shape} repeats={args.repeats} (CPU time)")
    print(f"runner_steps_per_s={runner_rate:.0f} bare_steps_per_s={bare_rate:.0f}")
    if floor_rates:
        floor_rate = statistics.median(floor_rates)
        print(f"floor_steps_per_s={floor_rate:.0f} floor_ratio={floor_rate / bare_rate:.3f}")
    print(f"ratio={runner_rate / bare_rate:.3f}")


if __name__ == "__main__":
    main()
