"""Benchmark: the cost of the agent loop and runner on top of an environment that does real work per step.

Headline: the built-in `arith` environment (`ArithEnv`, tasks from `ArithTasks`, its
real `reset` and `step`: tool-call checks, `calc` parsing and evaluating the
expression, `answer` checking the value). The policy answers every turn at once with
what a correct agent says, a `calc` call of the task's expression and then `answer`
with its value, both precomputed per task, so the policy itself costs next to
nothing; sampling asks max_tokens = the per-turn token limit, as `safactory rollout`
does. `RolloutRunner.stream` runs E such episodes (two steps each); the baseline is
a bare asyncio loop that resets the same environment on the same tasks and awaits
`env.step` with the same actions, in the same process and run. Every pass is timed in
CPU time of this process (`time.process_time`), repeats are interleaved and medians
reported, so other work on a shared machine skews the ratio little. The last line is
`ratio=<arith runner steps/s / arith bare steps/s>` (1.0 would mean the runner costs
nothing on top of the environment; target >= 0.7).

Also printed, for tracking only (no target): `trivial_ratio`, the same comparison on a
trivial environment that answers every step at once with one small tool message and
terminates after K steps (the runner's overhead with almost nothing beside it).

`--floor` also times, on arith, the least that any loop keeping validated records must
do (the two records per step, the trajectory per episode, nothing else) against the
same baseline, as `floor_ratio`: the ceiling for `ratio` while the records are
validated. `--profile` prints a cProfile of one arith runner pass first.

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
from collections.abc import Callable
from dataclasses import dataclass

from safactory.policy.base import Completion, SamplingParams
from safactory.sim.agent import EpisodeLimits
from safactory.sim.env import Environment, EnvSpec
from safactory.sim.envs.arith import ArithEnv, ArithTasks
from safactory.sim.runner import Admission, RolloutRunner
from safactory.types import Message, Observation, StepResult, Task, ToolCall, ToolSpec, Trajectory

# ---- the trivial environment (tracking figure) ------------------------------------------------

NOOP = ToolSpec(name="noop", description="Does nothing.")
SPEC = EnvSpec(id="trivial", version="1", tools=(NOOP,), max_turns=1_000_000)
NOOP_CALL = Completion(text="noop()", tool_calls=[ToolCall(id="c", name="noop")])


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


# ---- a workload: env, tasks and the precomputed answers of each task --------------------------

SAMPLING = SamplingParams(max_tokens=EpisodeLimits().max_tokens_per_turn)
"""As `safactory rollout` asks: max_tokens is the per-turn token limit."""


class ScriptedPolicy:
    """Answers instantly with the task's precomputed completions, the n-th on the n-th turn.

    The task is known by its prompt (the first message); the turn by how many messages
    the history holds (each turn adds the action and one observation).
    """

    def __init__(self, script: dict[str, list[Completion]], prompt_len: int) -> None:
        self.script = script
        self.prompt_len = prompt_len

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        return self.script[messages[0].content][(len(messages) - self.prompt_len) >> 1]


@dataclass
class Workload:
    """E episodes of one env, each with the completions a correct agent gives, in order."""

    name: str
    env_factory: Callable[[], Environment]
    tasks: list[Task]
    completions: list[list[Completion]]  # per task, one per step

    def policy(self) -> ScriptedPolicy:
        return ScriptedPolicy({t.prompt: c for t, c in zip(self.tasks, self.completions, strict=True)}, 1)

    def actions(self) -> list[list[Message]]:
        """The action messages the bare loop hands to `env.step` (built once, outside the timing)."""
        return [
            [Message(role="assistant", content=c.text, tool_calls=c.tool_calls) for c in cs] for cs in self.completions
        ]

    @property
    def steps(self) -> int:
        return sum(len(cs) for cs in self.completions)


def arith_workload(episodes: int) -> Workload:
    """ArithExpert's two turns per task (calc the expression, answer its value), precomputed."""
    tasks = ArithTasks().tasks("train", episodes)
    completions = []
    for task in tasks:
        expr, value = task.data["expression"], task.data["answer"]
        calc = ToolCall(id="call_1", name="calc", arguments={"expression": expr})
        answer = ToolCall(id="call_3", name="answer", arguments={"value": value})
        completions.append(
            [
                Completion(text=f"calc({expr})", tool_calls=[calc]),
                Completion(text=f"answer({value})", tool_calls=[answer]),
            ]
        )
    return Workload("arith", ArithEnv, tasks, completions)


def trivial_workload(episodes: int, k: int) -> Workload:
    TrivialEnv.k = k
    tasks = [Task(id=f"trivial/{i}", env_id="trivial", split="test", prompt=f"go {i}") for i in range(episodes)]
    return Workload("trivial", TrivialEnv, tasks, [[NOOP_CALL] * k for _ in tasks])


# ---- the three loops ------------------------------------------------------------------------


async def runner_steps(work: Workload, concurrency: int) -> tuple[int, float]:
    """Steps taken and CPU seconds for the episodes run by `RolloutRunner.stream`.

    Finished groups go to a sink that counts and drops them, as a sink that stores them
    does (retaining every trajectory until the end would add CPython garbage-collector
    work that grows with the number of live objects, which is the caller's choice).
    """
    limits = EpisodeLimits(max_turns=max(len(cs) for cs in work.completions))
    runner = RolloutRunner(work.env_factory, work.policy(), limits=limits, concurrency=concurrency, run_id="b")
    counted = {"steps": 0, "episodes": 0, "succeeded": 0}

    async def sink(group: list[Trajectory]) -> None:
        for traj in group:
            counted["steps"] += len(traj.steps)
            counted["episodes"] += 1
            counted["succeeded"] += traj.termination == "terminated" and traj.success

    admission = Admission(groups_per_batch=len(work.tasks), eta=0, version=lambda: 0)  # never holds a group back
    start = time.process_time()
    await runner.stream(iter(work.tasks), 1, SAMPLING, admission, sink)
    elapsed = time.process_time() - start
    assert counted["steps"] == work.steps, f"expected {work.steps} steps, got {counted['steps']}"
    assert counted["succeeded"] == counted["episodes"] == len(work.tasks), counted
    return counted["steps"], elapsed


async def bare_steps(work: Workload, actions: list[list[Message]]) -> tuple[int, float]:
    """Reset the env on each task and await `env.step` with its actions: the environment's own cost."""
    factory = work.env_factory
    start = time.process_time()
    steps = 0
    for task, episode in zip(work.tasks, actions, strict=True):
        env = factory()
        await env.reset(task, 0)
        for action in episode:
            result = await env.step(action)
            steps += 1
        assert result.terminated and (result.reward or 0.0) > 0
        await env.close()
    return steps, time.process_time() - start


async def floor_steps(work: Workload) -> tuple[int, float]:
    """Steps and CPU seconds of a stripped episode loop: only the validated records.

    Per step the assistant `Message` and the `Step`, per episode one `Trajectory` (steps
    validated with it, as the agent does); no ids, task hash, seeds, timeouts, copies,
    error handling or concurrency.
    """
    message = Message.__pydantic_validator__.validate_python
    trajectory = Trajectory.__pydantic_validator__.validate_python
    policy = work.policy()
    sampling = SAMPLING
    start = time.process_time()
    steps = 0
    for task, episode in zip(work.tasks, work.completions, strict=True):
        env = work.env_factory()
        obs = await env.reset(task, 0)
        messages, records = list(obs.messages), []
        for turn in range(len(episode)):
            completion = await policy.generate(messages, obs.tools, sampling)
            action = message({"role": "assistant", "content": completion.text, "tool_calls": completion.tool_calls})
            messages.append(action)
            result = await env.step(action)
            record = {"index": turn, "action": action, "observation": result.messages, "reward": result.reward}
            if result.info:
                record["info"] = result.info
            records.append(record)
            messages.extend(result.messages)
            steps += 1
        await env.close()
        trajectory({"task": task, "prompt": obs.messages, "tools": obs.tools, "steps": records})
    return steps, time.process_time() - start


def rate(measure: Callable[[], tuple[int, float]]) -> float:
    gc.collect()
    steps, elapsed = measure()
    return steps / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=2000, help="E: episodes per pass (arith and trivial)")
    parser.add_argument("--steps", type=int, default=16, help="K: steps per episode of the trivial env")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one arith runner pass and print the top")
    parser.add_argument("--floor", action="store_true", help="also time the stripped loop on arith (floor_ratio)")
    args = parser.parse_args()
    arith = arith_workload(args.episodes)
    trivial = trivial_workload(args.episodes, args.steps)
    arith_actions, trivial_actions = arith.actions(), trivial.actions()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(runner_steps(arith, args.concurrency))
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    for work in (arith, trivial):  # warm up imports and caches
        head = Workload(work.name, work.env_factory, work.tasks[:100], work.completions[:100])
        asyncio.run(runner_steps(head, args.concurrency))
    rates: dict[str, list[float]] = {k: [] for k in ("runner", "bare", "floor", "trivial_runner", "trivial_bare")}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits all alike
        rates["runner"].append(rate(lambda: asyncio.run(runner_steps(arith, args.concurrency))))
        rates["bare"].append(rate(lambda: asyncio.run(bare_steps(arith, arith_actions))))
        if args.floor:
            rates["floor"].append(rate(lambda: asyncio.run(floor_steps(arith))))
        rates["trivial_runner"].append(rate(lambda: asyncio.run(runner_steps(trivial, args.concurrency))))
        rates["trivial_bare"].append(rate(lambda: asyncio.run(bare_steps(trivial, trivial_actions))))
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    print(f"episodes={args.episodes} concurrency={args.concurrency} repeats={args.repeats} (CPU time, medians)")
    print(f"trivial: steps_per_episode={args.steps} runner_steps_per_s={med['trivial_runner']:.0f} ", end="")
    print(f"bare_steps_per_s={med['trivial_bare']:.0f}")
    print(f"arith: steps_per_episode=2 runner_steps_per_s={med['runner']:.0f} bare_steps_per_s={med['bare']:.0f}")
    if "floor" in med:
        print(f"floor_steps_per_s={med['floor']:.0f} floor_ratio={med['floor'] / med['bare']:.3f}")
    print(f"trivial_ratio={med['trivial_runner'] / med['trivial_bare']:.3f}")
    print(f"ratio={med['runner'] / med['bare']:.3f}")


if __name__ == "__main__":
    main()
