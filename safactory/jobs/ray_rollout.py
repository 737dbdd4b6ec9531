"""`safactory rollout --executor ray`: the rollout job's groups played by Ray rollout-worker actors.

Each worker builds the policy from its spec and the env from its registered id itself (nothing
but plain data travels), plays the groups it is handed and writes them to the store; the
controller plans the groups exactly as in process (same tasks, same member seeds), keeps a
bounded number in flight (`safactory.sim.ray_executor`) and reads each finished group back from
the store by its ids for the summary, so what it counts is what was stored.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from safactory.data.group_writer import StoreTarget
from safactory.data.store import TrajectoryStore
from safactory.policy.base import Policy, SamplingParams
from safactory.policy.specs import make_policy
from safactory.sim.agent import EpisodeLimits
from safactory.sim.ray_executor import RayOptions, RayRolloutPool
from safactory.sim.ray_worker import GroupJob, RegistryEnv, WorkerSetup
from safactory.sim.runner import StartRetry
from safactory.types import Task, Trajectory


class RayJob(Protocol):
    """What of a `RolloutJob` the Ray executor reads."""

    env: str
    policy: str
    seed: int
    device: str
    dtype: str
    redact: bool
    concurrency: int
    group_size: int
    temperature: float
    ray_address: str | None
    workers_per_node: int
    cpus_per_worker: float
    max_restarts: int


class Timed(Protocol):
    """Where the time the groups took is recorded (a `RolloutSummary`)."""

    elapsed_s: float
    interrupted: bool


@dataclass(frozen=True)
class SpecPolicy:
    """A worker's policy, built there from its spec (`safactory.policy.specs.make_policy`)."""

    spec: str
    env: str
    seed: int
    device: str = "cpu"
    dtype: str = "auto"

    def __call__(self, index: int) -> Policy:
        from safactory.sim.registry import default_registry

        entry = default_registry().get(self.env)
        return make_policy(self.spec, entry, self.seed + 7919 * index, device=self.device, dtype=self.dtype)


def first_indices(planned: list[tuple[Task, int]], group_size: int) -> list[tuple[Task, int, int]]:
    """Each planned group with the index of its first member: a task gone round again gets later seeds."""
    rounds: dict[str, int] = {}
    out = []
    for task, size in planned:
        round_ = rounds[task.id] = rounds.get(task.id, -1) + 1
        out.append((task, size, round_ * group_size))
    return out


async def run_on_ray(
    job: RayJob,
    store: TrajectoryStore,
    run_id: str,
    planned: list[tuple[Task, int]],
    limits: EpisodeLimits,
    provenance: dict[str, Any],
    finished: Callable[[Trajectory], None],
    summary: Timed,
    retry: StartRetry | None = None,
) -> None:
    """Play and store the planned groups on Ray workers; `finished` sees every stored trajectory.
    `summary.elapsed_s` gets the seconds the groups took (the workers' start not counted)."""
    setup = WorkerSetup(
        policy=SpecPolicy(job.policy, job.env, job.seed, job.device, job.dtype),
        envs={job.env: RegistryEnv(job.env)},
        store=StoreTarget(store.url, redact=job.redact),
        limits=limits,
        run_id=run_id,
        seed=job.seed,
        concurrency=job.concurrency,
        retry=retry,
        keyed_store=store.key is not None,
    )
    options = RayOptions(
        address=job.ray_address,
        workers_per_node=job.workers_per_node,
        cpus_per_worker=job.cpus_per_worker,
        max_restarts=job.max_restarts,
        groups_per_worker=max(1, math.ceil(job.concurrency / job.group_size)),
    )
    pool = RayRolloutPool(setup, options, provenance=lambda: dict(provenance), name=run_id)
    pool.start()  # in this thread: Ray sets its signal handlers only in the main thread
    sampling = SamplingParams(temperature=job.temperature, max_tokens=limits.max_tokens_per_turn)

    async def stored(group: GroupJob, ids: list[str]) -> None:
        for traj in await asyncio.to_thread(store.get, ids):
            finished(traj)

    started = time.perf_counter()
    try:
        await pool.run_groups(job.env, first_indices(planned, job.group_size), sampling, stored)
    except asyncio.CancelledError:
        summary.interrupted = True
        raise
    finally:
        summary.elapsed_s = time.perf_counter() - started
        await asyncio.to_thread(pool.close)
