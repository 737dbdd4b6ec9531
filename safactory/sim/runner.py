"""RolloutRunner: many concurrent episodes, grouped per task, with admission control.

A group is G episodes of the same task (the unit of group-relative advantages).
`run_groups` runs a fixed list of tasks; `stream` keeps admitting groups for as long
as asked, each only when the staleness bound allows it (see `Admission`), and hands
every finished group to a sink (typically: store it, then queue it for training).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from safactory.policy.base import Policy, SamplingParams
from safactory.sim.agent import EpisodeLimits, run_episode
from safactory.sim.env import Environment
from safactory.types import Task, Trajectory, uuid7


def episode_seed(base_seed: int, task_id: str, index: int) -> int:
    """A reproducible per-episode seed from the run seed, the task and the member index."""
    digest = hashlib.sha256(f"{base_seed}:{task_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class Admission:
    """Staleness bound by admission control.

    A new group may start only while
    `groups_started < (version + eta + 1) * groups_per_batch`, where `version` counts
    the trainer's updates since the bound was set up. With eta = 0 rollouts and
    training alternate (synchronous RL); with eta = k no admitted sample can be more
    than k versions old when the trainer uses it, so nothing is generated only to be
    thrown away.
    """

    def __init__(self, groups_per_batch: int, eta: int, version: Callable[[], int]) -> None:
        if groups_per_batch < 1 or eta < 0:
            raise ValueError("groups_per_batch must be >= 1 and eta >= 0")
        self.groups_per_batch = groups_per_batch
        self.eta = eta
        self.version = version
        self.started = 0
        self._changed = asyncio.Event()

    def allowed(self) -> bool:
        return self.started < (self.version() + self.eta + 1) * self.groups_per_batch

    async def acquire(self) -> None:
        while not self.allowed():
            self._changed.clear()
            await self._changed.wait()
        self.started += 1

    def notify(self) -> None:
        """Call after the version changed."""
        self._changed.set()


class RolloutRunner:
    """Runs groups of episodes concurrently against one policy."""

    def __init__(
        self,
        env_factory: Callable[[], Environment],
        policy: Policy,
        *,
        limits: EpisodeLimits,
        concurrency: int = 256,
        run_id: str = "",
        seed: int = 0,
        provenance: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.env_factory = env_factory
        self.policy = policy
        self.limits = limits
        self.run_id = run_id
        self.seed = seed
        self.provenance = provenance
        self._slots = asyncio.Semaphore(concurrency)
        self.episodes_done = 0

    async def _episode(
        self, task: Task, index: int, group_id: str, sampling: SamplingParams, kind: str, tags: dict[str, Any]
    ) -> Trajectory:
        async with self._slots:
            traj = await run_episode(
                self.env_factory,
                self.policy,
                task,
                seed=episode_seed(self.seed, task.id, index),
                sampling=sampling,
                limits=self.limits,
                run_id=self.run_id,
                group_id=group_id,
                kind=kind,
                tags=tags,
                provenance=self.provenance() if self.provenance else None,
            )
        self.episodes_done += 1
        return traj

    async def run_group(
        self,
        task: Task,
        group_size: int,
        sampling: SamplingParams,
        *,
        kind: str = "rollout",
        tags: dict[str, Any] | None = None,
    ) -> list[Trajectory]:
        group_id = uuid7()
        coros = [self._episode(task, i, group_id, sampling, kind, tags or {}) for i in range(group_size)]
        return list(await asyncio.gather(*coros))

    async def run_groups(
        self,
        tasks: list[Task],
        group_size: int,
        sampling: SamplingParams,
        *,
        kind: str = "rollout",
        tags: dict[str, Any] | None = None,
        on_group: Callable[[list[Trajectory]], None] | None = None,
    ) -> list[list[Trajectory]]:
        async def one(task: Task) -> list[Trajectory]:
            group = await self.run_group(task, group_size, sampling, kind=kind, tags=tags)
            if on_group is not None:
                on_group(group)
            return group

        return list(await asyncio.gather(*(one(t) for t in tasks)))

    async def stream(
        self,
        tasks: Iterator[Task],
        group_size: int,
        sampling: SamplingParams,
        admission: Admission,
        sink: Callable[[list[Trajectory]], Awaitable[None]],
        *,
        tags: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """Admit groups from `tasks` under `admission` and pass each finished group to `sink`.

        Runs until cancelled or the task iterator ends; in-flight groups are awaited
        on a normal end and cancelled with the stream.
        """
        running: set[asyncio.Task[None]] = set()

        async def one(task: Task) -> None:
            group = await self.run_group(task, group_size, sampling, tags=tags() if tags else None)
            await sink(group)

        try:
            for task in tasks:
                await admission.acquire()
                job = asyncio.create_task(one(task))
                running.add(job)
                job.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        finally:
            for job in running:
                job.cancel()
