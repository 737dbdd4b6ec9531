"""`safactory rollout`: run many episodes of one environment against one policy and store them all.

This file owns the rollout job: the orchestration (`rollout`: tasks from the env's
task source, groups of G episodes through `RolloutRunner`, every trajectory stored
through `StoreWriter` in a run created first), the progress bar and the summary
table, and the CLI entry point `rollout_command` (typer-compatible; `cli.py`
registers it as `rollout`). The policy comes from its spec (`safactory.policy.specs`:
`random`, `scripted`, `smollm2`, a model directory or `openai:<base_url>#<model>`); a model
runs in-process on `--device` with weights in `--dtype`.

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
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from safactory.data.judges import unsafe_by_env
from safactory.data.redact import Redactor
from safactory.data.store import TrajectoryStore, store_url
from safactory.data.writer import StoreWriter
from safactory.jobs.ray_rollout import run_on_ray
from safactory.policy.base import Policy, SamplingParams
from safactory.policy.specs import DEVICE_HELP, DTYPE_HELP, check_dtype, make_policy
from safactory.sim.agent import EpisodeLimits
from safactory.sim.env import EnvEntry, EnvRegistry
from safactory.sim.registry import default_registry
from safactory.sim.runner import RolloutRunner, StartRetry
from safactory.types import Task, Trajectory, canonical_json, sha256_hex, uuid7

ERROR_TERMINATIONS = frozenset({"env_error", "env_timeout", "policy_error", "timeout"})


# ---- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutJob:
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
    redact: bool = True  # secrets and personal data redacted before storing (False: raw, recorded in provenance)
    device: str = "cpu"  # where an in-process model policy runs (cpu, cuda, cuda:N, auto)
    dtype: str = "auto"  # its weights dtype (auto: bfloat16 on CUDA, float32 on the CPU)
    # executor "ray": groups played and stored by Ray rollout-worker actors (`safactory.jobs.ray_rollout`)
    executor: str = "local"
    ray_address: str | None = None  # the cluster to join; None: start Ray on this machine
    workers_per_node: int = 1
    cpus_per_worker: float = 1.0
    max_restarts: int = 3

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        for name in ("episodes", "concurrency", "group_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ValueError(f"max_total_tokens must be >= 1, not {self.max_total_tokens}")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, not {self.max_turns}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', not {self.executor!r}")


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
    labelled: int = 0  # episodes of an env that labels actions (safe or not): the unsafe rate's denominator
    unsafe: int = 0  # episodes the env labelled unsafe
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
        if any("unsafe_actions" in s.info or "unsafe" in s.info for s in traj.steps):
            self.labelled += 1
            self.unsafe += unsafe_by_env(traj)
        if traj.error:
            self.errors[error_kind(traj.error)] += 1

    @property
    def failed(self) -> int:
        """Episodes that ended in an error (env, policy, timeout)."""
        return sum(n for reason, n in self.terminations.items() if reason in ERROR_TERMINATIONS)

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    @property
    def unsafe_rate(self) -> float | None:
        """Unsafe episodes among those whose env labels actions; None when it labels none."""
        return self.unsafe / self.labelled if self.labelled else None

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
    config: RolloutJob,
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
    on_ray = config.executor == "ray"  # then each worker builds the policy itself
    policy = (
        None if on_ray else make_policy(config.policy, entry, config.seed, device=config.device, dtype=config.dtype)
    )
    limits = limits if limits is not None else _limits(config, entry)
    run_id = f"rollout-{uuid7()}"
    settings = asdict(config)
    provenance = {
        "policy": config.policy,
        "config_hash": sha256_hex(canonical_json(settings)),
        "code_version": _code_version(),
        "redacted": config.redact,
    }
    summary.run_id, summary.planned = run_id, config.episodes
    store = TrajectoryStore(store_url(config.db), redactor=Redactor() if config.redact else None)
    summary.store = store.url
    try:
        await asyncio.to_thread(
            store.create_run, run_id, {"command": "rollout", **settings}, provenance["code_version"]
        )

        def finished(traj: Trajectory) -> None:
            summary.add(traj)
            if on_episode is not None:
                on_episode(traj)

        planned = list(zip(tasks, plan, strict=False))
        if policy is None:
            work = run_on_ray(config, store, run_id, planned, limits, provenance, finished, summary, retry)
        else:
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
            work = _run_groups(config, runner, StoreWriter(store), planned, summary)
        try:
            await work
        finally:
            summary.stored = await asyncio.to_thread(store.count, run_id=run_id)
            if policy is not None:
                await _close_policy(policy)
    finally:
        store.close()
    return summary


def _limits(config: RolloutJob, entry: EnvEntry) -> EpisodeLimits:
    """The episode limits the options ask for (turns: the env's own unless `--max-turns`)."""
    env_turns = entry.spec.max_turns if entry.spec is not None else 1_000_000
    turns = config.max_turns or env_turns
    return EpisodeLimits(
        max_turns=turns,
        max_tokens_per_turn=config.max_tokens,
        max_total_tokens=config.max_total_tokens or config.max_tokens * turns,
    )


async def _run_groups(
    config: RolloutJob,
    runner: RolloutRunner,
    writer: StoreWriter,
    planned: list[tuple[Task, int]],
    summary: RolloutSummary,
) -> None:
    """Run the planned groups and hand each to the writer, closing the writer whatever happens."""
    sampling = SamplingParams(temperature=config.temperature, max_tokens=runner.limits.max_tokens_per_turn)
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
            for task, size in planned:
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


async def _close_policy(policy: Policy) -> None:
    closing = getattr(policy, "close", None)
    if closing is not None and inspect.isawaitable(result := closing()):
        await result


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
    if summary.unsafe_rate is not None:
        table.add_row("unsafe-action rate", f"{summary.unsafe_rate:.3f} ({summary.unsafe} of {summary.labelled})")
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


# where the episodes run (`--executor ray`: Ray rollout-worker actors; see docs/scaling.md)
ExecutorOption = Annotated[str, typer.Option("--executor", help="local (this process) | ray (rollout-worker actors)")]
RayAddressOption = Annotated[
    str | None, typer.Option("--ray-address", help="executor ray: the cluster (HOST:PORT; default: Ray started here)")
]
WorkersOption = Annotated[int, typer.Option("--workers-per-node", min=1, help="executor ray: workers per node")]
CpusOption = Annotated[float, typer.Option("--cpus-per-worker", min=0.0, help="executor ray: CPUs per worker")]


def rollout_command(
    env: Annotated[
        str,
        typer.Option(
            "--env", help="Environment: a registered id (arith, maze, ops), http://HOST:PORT, gym:<id>, mcp:<cmd>"
        ),
    ],
    policy: Annotated[
        str,
        typer.Option(
            "--policy", help="random | scripted | smollm2 | a saved model directory | openai:<base_url>#<model>"
        ),
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
    raw: Annotated[
        bool,
        typer.Option("--raw", help="Store secrets and personal data as they are (default: redacted; recorded)"),
    ] = False,
    device: Annotated[str, typer.Option("--device", help=f"{DEVICE_HELP}; model policies only")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
    executor: ExecutorOption = "local",
    ray_address: RayAddressOption = None,
    workers_per_node: WorkersOption = 1,
    cpus_per_worker: CpusOption = 1.0,
) -> None:
    """Run episodes of one environment against one policy, store every trajectory and print a summary."""
    try:
        config = RolloutJob(
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
            redact=not raw,
            device=device,
            dtype=dtype,
            executor=executor,
            ray_address=ray_address,
            workers_per_node=workers_per_node,
            cpus_per_worker=cpus_per_worker,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    summary = _run_with_progress(config)
    Console().print(summary_table(summary))
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.episodes and summary.failed == summary.episodes:  # stored, but nothing worked: say so in the exit status
        common = summary.errors.most_common(1)
        reason = f": {common[0][0]} ({common[0][1]} times)" if common else ""
        Console(stderr=True, highlight=False).print(f"every episode ended in an error{reason}", markup=False)
        raise typer.Exit(1)


def _run_with_progress(config: RolloutJob) -> RolloutSummary:
    """Run the job under a progress bar (ok / error counts); Ctrl-C ends it with what finished."""
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
        bar = progress.add_task(f"{config.env} x {config.policy}", total=config.episodes, ok=0, errors=0)

        def advance(traj: Trajectory) -> None:
            progress.update(bar, advance=1, ok=summary.successes, errors=summary.failed)

        try:
            asyncio.run(rollout(config, summary=summary, on_episode=advance))
        except KeyboardInterrupt:
            summary.interrupted = True
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    return summary
