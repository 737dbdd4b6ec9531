"""`safactory rollout`: run many episodes of one environment against one policy and store them all.

This file owns the rollout command: turning a policy spec into a Policy
(`make_policy`), the random policy that exercises environments' error paths, the
orchestration (`rollout`: tasks from the env's task source, groups of G episodes
through `RolloutRunner`, every trajectory stored through `StoreWriter` in a run
created first), the progress bar and the summary table, and the CLI entry point
`rollout_command` (typer-compatible; `cli.py` registers it as `rollout`).

Policy specs:

* `random`: `RandomPolicy`, random tool calls with guessed arguments, sometimes
  malformed on purpose (unknown tool, missing or ill-typed arguments, free text);
* `scripted`: the environment's registered expert (an error if it has none);
* a local model directory: a saved model run in-process by `LocalPolicy`;
* `openai:<base_url>#<model>`: any OpenAI-compatible endpoint (`EndpointPolicy`).

N episodes in groups of G take ceil(N / G) tasks of the split (the last group is
smaller when G does not divide N); a task source with fewer tasks (a small MCP task
file) is gone round again. Groups start only while there is room, so memory is
bounded by the concurrency, not by N.

Episodes that fail (env errors, timeouts, policy errors) are stored with their
termination reason like any other; only a store failure stops the run.
Interrupting the run (Ctrl-C) cancels the episodes in flight, closes their
environments, flushes the groups already handed to the store and prints the summary
of what finished.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from safactory.data.store import TrajectoryStore, store_url
from safactory.data.writer import StoreWriter
from safactory.policy.base import Completion, Policy, SamplingParams
from safactory.sim.agent import EpisodeLimits
from safactory.sim.env import EnvEntry, EnvRegistry
from safactory.sim.registry import default_registry
from safactory.sim.runner import RolloutRunner, StartRetry
from safactory.types import Message, Task, ToolCall, ToolSpec, Trajectory, canonical_json, sha256_hex, uuid7

ERROR_TERMINATIONS = frozenset({"env_error", "env_timeout", "policy_error", "timeout"})
_TOKEN = re.compile(r"[A-Za-z0-9_.@/+*-]+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORDS = ("yes", "no", "done", "up", "left", "hello", "ok", "help", "stop", "42")


# ---- the random policy --------------------------------------------------------------------------


class RandomPolicy:
    """Random plausible actions, some of them malformed on purpose.

    Each turn it picks one of the offered tools and fills its arguments from the JSON
    Schema: an enum value, or a value guessed from the conversation (numbers, words,
    paths, addresses, an expression made of the numbers) or drawn at random for the
    schema's type. With probability `error_rate` the action is broken in one of these
    ways, so that environments' error handling gets exercised: free text instead of a
    tool call, an unknown tool, a missing required argument, an argument of the wrong
    type, an unexpected extra argument. Text is written in the plain-text tool
    protocol (`name(arg)`), the same as a small model's.
    """

    version = 0

    def __init__(self, seed: int = 0, error_rate: float = 0.3) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], not {error_rate}")
        self.rng = random.Random(seed)
        self.error_rate = error_rate

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        rng = self.rng
        guesses = self._guesses(messages)
        if not tools or rng.random() < self.error_rate / 4:
            return self._text(rng.choice(guesses + list(_WORDS)), tools)
        tool = rng.choice(tools)
        name = tool.name
        arguments = {p: self._value(schema, guesses) for p, schema in _properties(tool).items()}
        if rng.random() < self.error_rate:
            name, arguments = self._break(tool, arguments, guesses)
        call = ToolCall(id=f"call_{len(messages)}", name=name, arguments=arguments)
        text = _call_text(call)
        return Completion(text=text, tool_calls=[call], policy_version=self.version)

    def _text(self, text: str, tools: list[ToolSpec]) -> Completion:
        from safactory.policy.chat import parse_tool_calls  # transformers comes with it: only when needed

        calls, error = parse_tool_calls(text, tools)
        return Completion(text=text, tool_calls=calls, parse_error=error, policy_version=self.version)

    def _break(self, tool: ToolSpec, arguments: dict[str, Any], guesses: list[str]) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        required = [p for p in tool.parameters.get("required", []) if p in arguments]
        ways = ["unknown_tool", "wrong_type", "extra_argument"] + (["missing_argument"] if required else [])
        way = rng.choice(ways)
        if way == "unknown_tool":
            return rng.choice([tool.name + "_x", "run", "search", rng.choice(guesses)]), arguments
        broken = dict(arguments)
        if way == "missing_argument":
            del broken[rng.choice(required)]
        elif way == "wrong_type" and broken:
            broken[rng.choice(list(broken))] = rng.choice([None, 12345, [1, 2], {"x": 1}, True, ""])
        else:
            broken[rng.choice(["bogus", "extra", "verbose"])] = rng.choice([1, "x", None])
        return tool.name, broken

    def _value(self, schema: dict[str, Any], guesses: list[str]) -> Any:
        rng = self.rng
        if "enum" in schema and schema["enum"]:
            return rng.choice(list(schema["enum"]))
        # The parameter's description often lists valid values ("... name: left, down, right, up").
        description = str(schema.get("description", ""))
        hinted = [t.strip(".,;:") for t in _TOKEN.findall(description.rpartition(":")[2])]
        hinted = [t for t in hinted if t and t.lower() not in {"a", "an", "or", "and", "the", "e.g"}]
        if hinted and rng.random() < 0.6:
            guesses = hinted
        kind = schema.get("type", "string")
        if isinstance(kind, list):
            kind = rng.choice(kind) if kind else "string"
        if kind == "integer":
            numbers = [int(float(g)) for g in guesses if _NUMBER.fullmatch(g)]
            return rng.choice(numbers) if numbers and rng.random() < 0.7 else rng.randint(-1, 10)
        if kind == "number":
            numbers = [float(g) for g in guesses if _NUMBER.fullmatch(g)]
            return rng.choice(numbers) if numbers and rng.random() < 0.7 else round(rng.uniform(-10, 100), 2)
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "array":
            items = schema.get("items", {"type": "string"})
            return [self._value(items, guesses) for _ in range(rng.randint(0, 2))]
        if kind == "object":
            return {p: self._value(s, guesses) for p, s in schema.get("properties", {}).items()}
        if kind == "null":
            return None
        return self._string(guesses)

    def _string(self, guesses: list[str]) -> str:
        rng = self.rng
        numbers = [g for g in guesses if _NUMBER.fullmatch(g)]
        roll = rng.random()
        if roll < 0.15 and len(numbers) >= 2:
            a, b = rng.sample(numbers, 2)
            return f"{a}{rng.choice('+-*')}{b}"
        if roll < 0.4 and guesses:  # the freshest tokens (a tool's last answer) are the likeliest to fit
            return rng.choice(guesses[:3])
        if roll < 0.85 and guesses:
            return rng.choice(guesses)
        return rng.choice(["", "x", "/tmp", "hello world", str(rng.randint(0, 999))])

    @staticmethod
    def _guesses(messages: list[Message]) -> list[str]:
        """Tokens of the latest messages (the task and the freshest observations), newest first."""
        found: list[str] = []
        for message in reversed(messages[-6:]):
            for token in _TOKEN.findall(message.content):
                token = token.strip(".,;:")
                if token and token not in found:
                    found.append(token)
                if len(found) >= 64:
                    return found
        return found


def _call_text(call: ToolCall) -> str:
    """A call in the plain-text tool protocol: `name(arg)`, or `name({json})` for other than one argument."""
    args = call.arguments
    inner = str(next(iter(args.values()))) if len(args) == 1 else json.dumps(args)
    return f"{call.name}({inner})"


def _properties(tool: ToolSpec) -> dict[str, dict[str, Any]]:
    props = tool.parameters.get("properties", {})
    return {p: (s if isinstance(s, dict) else {}) for p, s in props.items()} if isinstance(props, dict) else {}


# ---- policy specs -------------------------------------------------------------------------------


def make_policy(spec: str, env_entry: EnvEntry, seed: int) -> Policy:
    """The Policy a spec names: `random`, `scripted`, a model directory or `openai:<base_url>#<model>`.

    Raises ValueError with a message that says what is wrong and what is accepted.
    """
    spec = spec.strip()
    if spec == "random":
        return RandomPolicy(seed=seed)
    if spec == "scripted":
        env_id = env_entry.spec.id if env_entry.spec is not None else "this environment"
        if env_entry.expert is None:
            raise ValueError(
                f"environment {env_id!r} has no scripted expert; use --policy random, a model directory "
                "or openai:<base_url>#<model>"
            )
        try:
            return env_entry.expert()
        except TypeError as exc:
            raise ValueError(f"the scripted expert of {env_id!r} cannot be built without arguments: {exc}") from exc
    if spec.startswith("openai:"):
        from safactory.policy.endpoint import EndpointPolicy

        return EndpointPolicy.from_spec(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _local_policy(path, seed)
    if "/" in spec or spec.startswith("."):
        raise ValueError(f"policy {spec!r}: no such model directory")
    raise ValueError(
        f"unknown policy {spec!r}: use random, scripted, a saved model directory or openai:<base_url>#<model>"
    )


def _local_policy(path: Path, seed: int) -> Policy:
    """A saved model directory (tiny, HF with a chat template, or LoRA adapter) run in-process."""
    from safactory.policy.local import LocalPolicy
    from safactory.policy.models import load_policy_model

    loaded = load_policy_model(str(path), seed=seed)
    return LocalPolicy(loaded.model, loaded.chat, seed=seed)


# ---- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutConfig:
    """What `safactory rollout` was asked to do (stored as the run's config)."""

    env: str
    policy: str
    db: str
    episodes: int = 16
    concurrency: int = 64
    split: str = "test"
    group_size: int = 1
    max_turns: int | None = None
    temperature: float = 1.0
    seed: int = 0
    max_tokens: int = 64
    max_total_tokens: int | None = None  # None: max_tokens on every turn the turn limit allows

    def __post_init__(self) -> None:
        for name in ("episodes", "concurrency", "group_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ValueError(f"max_total_tokens must be >= 1, not {self.max_total_tokens}")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, not {self.max_turns}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")


@dataclass
class RolloutSummary:
    """Counts over the finished episodes of one rollout."""

    run_id: str = ""
    store: str = ""
    planned: int = 0
    tasks: int = 0
    episodes: int = 0
    stored: int = 0
    successes: int = 0
    reward_sum: float = 0.0
    steps: int = 0
    action_errors: int = 0
    retried: int = 0
    terminations: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    interrupted: bool = False

    def add(self, traj: Trajectory) -> None:
        self.episodes += 1
        self.successes += traj.success
        self.reward_sum += traj.reward
        self.steps += len(traj.steps)
        self.action_errors += sum(1 for s in traj.steps if s.error or s.info.get("errors"))
        self.retried += int(traj.tags.get("attempts", 1)) > 1
        self.terminations[traj.termination] += 1
        if traj.error:
            self.errors[error_kind(traj.error)] += 1

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.episodes if self.episodes else 0.0

    @property
    def episodes_per_s(self) -> float:
        return self.episodes / self.elapsed_s if self.elapsed_s > 0 else 0.0


def error_kind(error: str) -> str:
    """A short, countable form of an episode's error.

    `env step failed: ValueError('x')` becomes `env step failed: ValueError`.
    """
    match = re.match(r"([^:]{1,60}): (\w+)\(", error)
    if match:
        return f"{match.group(1)}: {match.group(2)}"
    return error[:60]


def _code_version() -> str:
    try:
        from safactory.provenance import code_version

        return code_version()
    except Exception:  # provenance is best effort; never stop a run over it
        return ""


def group_plan(episodes: int, group_size: int) -> list[int]:
    """Group sizes: full groups of `group_size`, then one smaller group for the remainder."""
    full, rest = divmod(episodes, group_size)
    return [group_size] * full + ([rest] if rest else [])


async def rollout(
    config: RolloutConfig,
    *,
    registry: EnvRegistry | None = None,
    summary: RolloutSummary | None = None,
    on_episode: Callable[[Trajectory], None] | None = None,
    retry: StartRetry | None = None,
    limits: EpisodeLimits | None = None,
) -> RolloutSummary:
    """Run `config.episodes` episodes and store every trajectory; returns (and fills) the summary.

    Raises ValueError for a bad environment id, policy spec or split before anything
    is stored.
    """
    summary = summary if summary is not None else RolloutSummary()
    registry = registry if registry is not None else default_registry()
    try:
        entry = registry.get(config.env)
    except KeyError as exc:
        raise ValueError(str(exc.args[0]) if exc.args else str(exc)) from exc
    plan = group_plan(config.episodes, config.group_size)
    tasks: list[Task] = await asyncio.to_thread(entry.tasks().tasks, config.split, len(plan))
    if not tasks:
        raise ValueError(f"{config.env} has no {config.split!r} tasks")
    summary.tasks = len(tasks)
    if len(tasks) < len(plan):  # a small task file: go round it again rather than run fewer episodes
        tasks = [tasks[i % len(tasks)] for i in range(len(plan))]
    policy = make_policy(config.policy, entry, config.seed)
    if limits is None:
        env_turns = entry.spec.max_turns if entry.spec is not None else 1_000_000
        turns = config.max_turns or env_turns
        limits = EpisodeLimits(
            max_turns=turns,
            max_tokens_per_turn=config.max_tokens,
            max_total_tokens=config.max_total_tokens or config.max_tokens * turns,
        )
    sampling = SamplingParams(temperature=config.temperature, max_tokens=limits.max_tokens_per_turn)

    run_id = f"rollout-{uuid7()}"
    settings = asdict(config)
    config_hash = sha256_hex(canonical_json(settings))
    provenance = {"policy": config.policy, "config_hash": config_hash, "code_version": _code_version()}
    summary.run_id, summary.planned = run_id, config.episodes
    store = TrajectoryStore(store_url(config.db))
    summary.store = store.url
    try:
        await asyncio.to_thread(
            store.create_run, run_id, {"command": "rollout", **settings}, provenance["code_version"]
        )
        writer = StoreWriter(store)

        def finished(traj: Trajectory) -> None:
            summary.add(traj)
            if on_episode is not None:
                on_episode(traj)

        runner = RolloutRunner(
            entry.factory,
            policy,
            limits=limits,
            concurrency=config.concurrency,
            run_id=run_id,
            seed=config.seed,
            provenance=lambda: dict(provenance),
            retry=retry,
            on_episode=finished,
        )
        # Groups are started only while there is room, so memory stays bounded by the
        # concurrency (plus the groups waiting on the store), not by the number of episodes.
        room = asyncio.Semaphore(max(2, 2 * math.ceil(config.concurrency / config.group_size)))

        async def one(task: Task, size: int, first_index: int) -> None:
            try:
                await writer.put(await runner.run_group(task, size, sampling, first_index=first_index))
            finally:
                room.release()

        rounds: dict[str, int] = {}  # a task file gone round again: its tasks' later groups get other seeds

        started = time.perf_counter()
        try:
            async with asyncio.TaskGroup() as jobs:
                for task, size in zip(tasks, plan, strict=False):
                    await room.acquire()
                    round_ = rounds[task.id] = rounds.get(task.id, -1) + 1
                    jobs.create_task(one(task, size, round_ * config.group_size))
        except asyncio.CancelledError:
            summary.interrupted = True
            raise
        except BaseExceptionGroup as failed:  # a store failure: report it as itself
            raise failed.exceptions[0] from None
        finally:
            summary.elapsed_s = time.perf_counter() - started
            await writer.close()  # also commits groups whose put was cut short by an interrupt
            summary.stored = await asyncio.to_thread(store.count, run_id=run_id)
            closing = getattr(policy, "close", None)
            if closing is not None and inspect.isawaitable(result := closing()):
                await result
    finally:
        store.close()
    return summary


# ---- presentation -------------------------------------------------------------------------------


def summary_table(summary: RolloutSummary) -> Table:
    """The summary as a rich table."""
    title = f"rollout {summary.run_id}" + (" (interrupted)" if summary.interrupted else "")
    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("episodes", f"{summary.episodes} of {summary.planned}")
    table.add_row("distinct tasks", str(summary.tasks))
    table.add_row("stored", str(summary.stored))
    table.add_row("success rate", f"{summary.success_rate:.3f}")
    table.add_row("mean reward", f"{summary.mean_reward:.3f}")
    table.add_row("steps", str(summary.steps))
    table.add_row("steps with action errors", str(summary.action_errors))
    table.add_row("episodes retried at start", str(summary.retried))
    table.add_row("episodes/s", f"{summary.episodes_per_s:.2f}")
    for reason, n in sorted(summary.terminations.items(), key=lambda kv: (-kv[1], kv[0])):
        label = f"termination: {reason}" + (" (error)" if reason in ERROR_TERMINATIONS else "")
        table.add_row(label, str(n))
    for kind, n in sorted(summary.errors.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(f"error: {kind}", str(n))
    table.add_row("store", summary.store)
    return table


def rollout_command(
    env: Annotated[
        str,
        typer.Option(
            "--env", help="Environment: a registered id (arith, maze, ops), http://HOST:PORT, gym:<id>, mcp:<cmd>"
        ),
    ],
    policy: Annotated[
        str, typer.Option("--policy", help="random | scripted | a saved model directory | openai:<base_url>#<model>")
    ],
    db: Annotated[
        str, typer.Option("--db", help="Store URL (sqlite:///path/store.db, postgresql+psycopg://...) or a run dir")
    ],
    episodes: Annotated[int, typer.Option("--episodes", min=1, help="Episodes to run in all")] = 16,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Episodes running at once")] = 64,
    split: Annotated[str, typer.Option("--split", help="Task split to draw tasks from")] = "test",
    group_size: Annotated[int, typer.Option("--group-size", min=1, help="Episodes per task (G)")] = 1,
    max_turns: Annotated[
        int | None, typer.Option("--max-turns", min=1, help="Turn limit per episode (default: the env's own)")
    ] = None,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the episodes and of the policy")] = 0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens per turn for model policies")] = 64,
    max_total_tokens: Annotated[
        int | None,
        typer.Option("--max-total-tokens", min=1, help="Tokens per episode (default: --max-tokens x the turn limit)"),
    ] = None,
) -> None:
    """Run episodes of one environment against one policy, store every trajectory and print a summary."""
    try:
        config = RolloutConfig(
            env=env,
            policy=policy,
            db=db,
            episodes=episodes,
            concurrency=concurrency,
            split=split,
            group_size=group_size,
            max_turns=max_turns,
            temperature=temperature,
            seed=seed,
            max_tokens=max_tokens,
            max_total_tokens=max_total_tokens,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console = Console()
    summary = RolloutSummary()
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("ok {task.fields[ok]}  errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task(f"{env} x {policy}", total=episodes, ok=0, errors=0)

        def advance(traj: Trajectory) -> None:
            failed = sum(n for reason, n in summary.terminations.items() if reason in ERROR_TERMINATIONS)
            progress.update(bar, advance=1, ok=summary.successes, errors=failed)

        try:
            asyncio.run(rollout(config, summary=summary, on_episode=advance))
        except KeyboardInterrupt:
            summary.interrupted = True
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    console.print(summary_table(summary))
    if summary.interrupted:
        raise typer.Exit(130)
    failed = sum(n for reason, n in summary.terminations.items() if reason in ERROR_TERMINATIONS)
    if summary.episodes and failed == summary.episodes:  # stored, but nothing worked: say so in the exit status
        common = summary.errors.most_common(1)
        reason = f": {common[0][0]} ({common[0][1]} times)" if common else ""
        Console(stderr=True, highlight=False).print(f"every episode ended in an error{reason}", markup=False)
        raise typer.Exit(1)
