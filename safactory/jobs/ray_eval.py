"""`safactory eval --executor ray`: a suite entry's episodes played and stored by Ray rollout-worker actors.

Every entry gets workers of its own (a `RayRolloutPool` per entry, all on one Ray connection): the
episode limits and, for `--policy scripted`, the policy (the entry's env's expert, with the entry's
expert options) differ from one entry to the next. A worker builds the policy from its spec and the
env from its registered id itself; a risk suite's `RiskEnv` is built there over the worker's own
registry, and its cases, ordinary tasks, travel with the groups. The worker stores each group as
kind `eval` and hands back the ids; the controller reads the trajectories back from the store in the
order of its plan (one group of `epochs` attempts per task, as in process), so they are scored and
judged, and eval.json written, exactly as with the local executor.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from safactory.data.group_writer import StoreTarget
from safactory.data.store import TrajectoryStore
from safactory.jobs.ray_rollout import SpecPolicy
from safactory.policy.base import Policy, SamplingParams
from safactory.sim.agent import EpisodeLimits
from safactory.sim.env import Environment, EnvRegistry
from safactory.sim.envs.risk import ENV_ID as RISK_ENV
from safactory.sim.envs.risk import RiskEnv
from safactory.sim.ray_executor import RayOptions, RayRolloutPool, connect, import_ray
from safactory.sim.ray_worker import GroupJob, RegistryEnv, WorkerSetup
from safactory.types import Task, Trajectory


class RayEvalJob(Protocol):
    """What of an `EvalJob` the Ray executor reads."""

    policy: str
    seed: int
    device: str
    dtype: str
    redact: bool
    concurrency: int
    ray_address: str | None
    workers_per_node: int
    cpus_per_worker: float
    max_restarts: int


@functools.cache
def _worker_registry() -> EnvRegistry:
    """The env registry of this (worker) process, built once."""
    from safactory.sim.registry import default_registry

    return default_registry()


@dataclass(frozen=True)
class WorkerRiskEnv:
    """A risk suite's env, built in the worker: `RiskEnv` over the worker's registry (its base envs)."""

    def __call__(self) -> Environment:
        return RiskEnv(_worker_registry().get)


@dataclass(frozen=True)
class ExpertPolicy:
    """A worker's scripted policy with options: the expert of registered env `env`, built with `options`."""

    env: str
    options: dict[str, Any] = field(default_factory=dict)

    def __call__(self, index: int) -> Policy:
        expert = _worker_registry().get(self.env).expert
        if expert is None:
            raise ValueError(f"{self.env} has no scripted expert")
        return expert(**self.options)


@dataclass(frozen=True)
class EntryPlan:
    """One suite entry as its workers play it: one group of `epochs` attempts per task."""

    env: str  # a registered id, or "risk" (a risk suite, played by RiskEnv)
    policy_env: str  # whose expert a scripted policy is: the entry's env, or the risk cases' base env
    expert: dict[str, Any]  # the expert's options (none: the policy spec as it is)
    tasks: list[Task]
    epochs: int
    limits: EpisodeLimits
    sampling: SamplingParams
    provenance: dict[str, Any]
    tags: dict[str, Any]


def env_factory(env: str) -> Callable[[], Environment]:
    """How a worker builds an entry's env: a risk suite's RiskEnv, else the env registered under `env`."""
    return WorkerRiskEnv() if env == RISK_ENV else RegistryEnv(env)


def policy_factory(job: RayEvalJob, plan: EntryPlan) -> Callable[[int], Policy]:
    """How a worker builds the entry's policy, as the local executor would (`safactory.jobs.eval._policy`)."""
    if job.policy == "scripted" and plan.expert:
        return ExpertPolicy(plan.policy_env, dict(plan.expert))
    spec = job.policy
    if Path(spec).expanduser().is_dir():  # a model directory: the same one from the worker's working directory
        spec = str(Path(spec).expanduser().resolve())
    return SpecPolicy(spec, plan.policy_env, job.seed, job.device, job.dtype)


def ray_options(job: RayEvalJob, epochs: int = 1) -> RayOptions:
    return RayOptions(
        address=job.ray_address,
        workers_per_node=job.workers_per_node,
        cpus_per_worker=job.cpus_per_worker,
        max_restarts=job.max_restarts,
        groups_per_worker=max(1, math.ceil(job.concurrency / epochs)),
    )


@asynccontextmanager
async def ray_connection(job: RayEvalJob) -> AsyncIterator[None]:
    """One Ray connection for the whole evaluation (its entries' pools come and go on it)."""
    owned = connect(ray_options(job))  # in this thread: Ray sets its signal handlers only in the main thread
    try:
        yield
    finally:
        if owned:
            import_ray().shutdown()


async def play_entry(
    job: RayEvalJob, store: TrajectoryStore, run_id: str, plan: EntryPlan, name: str
) -> tuple[list[Trajectory], dict[str, Any]]:
    """Play and store the entry's groups on Ray workers; returns the stored trajectories in plan order
    (task by task, attempt by attempt) and what the workers said of their policy (version, weights hash)."""
    setup = WorkerSetup(
        policy=policy_factory(job, plan),
        envs={plan.env: env_factory(plan.env)},
        store=StoreTarget(store.url, redact=job.redact),
        limits=plan.limits,
        run_id=run_id,
        seed=job.seed,
        concurrency=job.concurrency,
        keyed_store=store.key is not None,
    )
    provenance = plan.provenance
    pool = RayRolloutPool(setup, ray_options(job, plan.epochs), provenance=lambda: dict(provenance), name=name)
    pool.start()
    # where each group goes in the plan: by its task object (a task listed twice plays the same seeds)
    slots: dict[int, list[int]] = {}
    for i, task in enumerate(plan.tasks):
        slots.setdefault(id(task), []).append(i)
    ids: list[list[str]] = [[] for _ in plan.tasks]

    async def stored(group: GroupJob, group_ids: list[str]) -> None:
        ids[slots[id(group.task)].pop(0)] = group_ids

    try:
        planned = [(task, plan.epochs, 0) for task in plan.tasks]
        await pool.run_groups(plan.env, planned, plan.sampling, stored, kind="eval", tags=plan.tags)
        identity = await asyncio.to_thread(pool.policy_identity)
    finally:
        await asyncio.to_thread(pool.close)
    trajs = await asyncio.to_thread(store.get, [i for group in ids for i in group])
    return trajs, identity
