"""RolloutRunner: many concurrent episodes, grouped per task, with admission control and start retries.

A group is G episodes of the same task (the unit of group-relative advantages).
`run_groups` runs a fixed list of tasks; `stream` keeps admitting groups for as long
as asked, each only when the staleness bound allows it (see `Admission`), and hands
every finished group to a sink (typically: store it, then queue it for training).

Robustness:

* Infrastructure failures at episode start (the env cannot be built, or its `reset`
  raises a connection-type error: `RemoteEnvUnavailable`, a full env server,
  `ConnectionError` or another `OSError` that is not a timeout) are retried a bounded
  number of times with exponential backoff and jitter (`StartRetry`); the episode
  slot is released while waiting. The trajectory records how many attempts it took in
  `tags["attempts"]`. Errors inside a running episode are never retried: they end
  the episode with a recorded reason (see `safactory.sim.agent`), and a start that
  still fails after the last attempt is stored as an `env_error` trajectory too.
* Cancelling `run_group`, `run_groups` or `stream` cancels the episodes in flight;
  each closes its environment on the way out. A failure that escapes one episode
  (a bug, not an episode-level error) cancels its siblings the same way.
* `on_episode` is called with every finished trajectory (progress bars, counters).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from safactory.policy.base import Policy, SamplingParams
from safactory.sim.agent import EpisodeLimits, play_episode
from safactory.sim.env import Environment
from safactory.sim.wire import RemoteEnvUnavailable, SessionLimitError
from safactory.types import Task, Trajectory, uuid7

_T = TypeVar("_T")

RETRYABLE: tuple[type[BaseException], ...] = (OSError, RemoteEnvUnavailable, SessionLimitError)
"""Exceptions at episode start that mean "the infrastructure is not there (yet)"; TimeoutError excepted."""


def episode_seed(base_seed: int, task_id: str, index: int) -> int:
    """A reproducible per-episode seed from the run seed, the task and the member index."""
    digest = hashlib.sha256(f"{base_seed}:{task_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True)
class StartRetry:
    """Bounded retries of an episode whose start failed for infrastructure reasons.

    `attempts` counts every try, the first included (1 = no retries). Before try
    k + 1 the runner waits `min(backoff_s * 2**(k-1), max_backoff_s)`, scaled by a
    random factor in [0.5, 1] so that many episodes failing together do not retry
    in lockstep.
    """

    attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    retry_on: tuple[type[BaseException], ...] = RETRYABLE

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("attempts must be >= 1 and backoff times >= 0")

    def retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, self.retry_on) and not isinstance(exc, TimeoutError)

    def delay_s(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1-based)."""
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s) * random.uniform(0.5, 1.0)


async def gather_or_cancel(coros: list[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Run coroutines concurrently and return their results in order.

    If the caller is cancelled, or one of them raises, the others are cancelled and
    awaited before the exception propagates, so nothing is left running (and every
    episode has closed its environment).
    """
    if len(coros) == 1:  # nothing to run beside it: no task, no gather
        return [await coros[0]]
    jobs = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*jobs))
    except BaseException:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        raise


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
    """Runs groups of episodes concurrently against one policy.

    `concurrency` bounds the episodes running at once; `retry` governs retries of
    failed starts; `on_episode` is called with each finished trajectory.
    """

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
        retry: StartRetry | None = None,
        on_episode: Callable[[Trajectory], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, not {concurrency}")
        self.env_factory = env_factory
        self.policy = policy
        self.limits = limits
        self.run_id = run_id
        self.seed = seed
        self.provenance = provenance
        self.retry = retry if retry is not None else StartRetry()
        self.on_episode = on_episode
        self._slots = asyncio.Semaphore(concurrency)
        self.episodes_done = 0
        self.start_retries = 0

    async def _episode(
        self,
        task: Task,
        index: int,
        group_id: str,
        task_hash: str,
        sampling: SamplingParams,
        kind: str,
        tags: dict[str, Any],
    ) -> Trajectory:
        seed = episode_seed(self.seed, task.id, index)
        slots = self._slots
        attempt = 0
        while True:
            attempt += 1
            await slots.acquire()  # what `async with slots` does, without its two extra coroutines
            try:
                provenance = self.provenance() if self.provenance else None
                traj, start_error = await self._attempt(
                    task, seed, group_id, task_hash, sampling, kind, tags, provenance
                )
            finally:
                slots.release()
            if start_error is None or attempt >= self.retry.attempts or not self.retry.retryable(start_error):
                break
            self.start_retries += 1
            await asyncio.sleep(self.retry.delay_s(attempt))
        if traj is None:
            assert start_error is not None
            traj = self._start_failure(task, seed, group_id, task_hash, kind, tags, provenance, start_error)
        traj.tags["attempts"] = attempt
        self.episodes_done += 1
        if self.on_episode is not None:
            self.on_episode(traj)
        return traj

    async def _attempt(
        self,
        task: Task,
        seed: int,
        group_id: str,
        task_hash: str,
        sampling: SamplingParams,
        kind: str,
        tags: dict[str, Any],
        provenance: dict[str, Any] | None,
    ) -> tuple[Trajectory | None, BaseException | None]:
        """One try at an episode: its trajectory, and the error if it failed to start.

        The trajectory is None when the env could not be built; the error is set when
        building the env or its `reset` raised, so the caller can decide to retry.
        """
        started = time.time()
        try:
            env = self.env_factory()
        except Exception as exc:
            return None, exc
        return await self._play(env, task, seed, group_id, task_hash, sampling, kind, tags, provenance, started)

    async def _play(
        self,
        env: Environment,
        task: Task,
        seed: int,
        group_id: str,
        task_hash: str,
        sampling: SamplingParams,
        kind: str,
        tags: dict[str, Any],
        provenance: dict[str, Any] | None,
        started: float,
    ) -> tuple[Trajectory, BaseException | None]:
        """One episode of `task` on `env` by this runner's policy and limits (see `play_episode`)."""
        return await play_episode(
            env,
            self.policy,
            task,
            seed=seed,
            sampling=sampling,
            limits=self.limits,
            run_id=self.run_id,
            group_id=group_id,
            kind=kind,
            tags=tags,
            provenance=provenance,
            task_hash=task_hash,
            started=started,
        )

    def _start_failure(
        self,
        task: Task,
        seed: int,
        group_id: str,
        task_hash: str,
        kind: str,
        tags: dict[str, Any],
        provenance: dict[str, Any] | None,
        exc: BaseException,
    ) -> Trajectory:
        """The trajectory of an episode whose environment could not even be built."""
        return Trajectory(
            run_id=self.run_id,
            group_id=group_id,
            kind=kind,
            task=task,
            task_hash=task_hash,
            env_id=task.env_id,
            seed=seed,
            tags=dict(tags),
            provenance=dict(provenance or {}),
            termination="env_error",
            error=f"env start failed: {exc!r}",
        )

    async def run_group(
        self,
        task: Task,
        group_size: int,
        sampling: SamplingParams,
        *,
        kind: str = "rollout",
        tags: dict[str, Any] | None = None,
        first_index: int = 0,
    ) -> list[Trajectory]:
        """One group of `group_size` episodes of `task`. Member i's seed comes from the run seed, the
        task and `first_index + i` (a later group of the same task passes a later `first_index` to get
        other seeds)."""
        group_id = uuid7()
        task_hash = task.hash()  # once per group: every episode of it plays the same task
        members = range(first_index, first_index + group_size)
        return await gather_or_cancel(
            [self._episode(task, i, group_id, task_hash, sampling, kind, tags or {}) for i in members]
        )

    async def run_groups(
        self,
        tasks: list[Task],
        group_size: int,
        sampling: SamplingParams,
        *,
        kind: str = "rollout",
        tags: dict[str, Any] | None = None,
        on_group: Callable[[list[Trajectory]], Awaitable[None] | None] | None = None,
    ) -> list[list[Trajectory]]:
        """One group per task; `on_group` (plain or async) sees each group as it finishes."""

        async def one(task: Task) -> list[Trajectory]:
            group = await self.run_group(task, group_size, sampling, kind=kind, tags=tags)
            if on_group is not None:
                result = on_group(group)
                if inspect.isawaitable(result):
                    await result
            return group

        return await gather_or_cancel([one(t) for t in tasks])

    @staticmethod
    async def _admitted(admission: Admission, settled: asyncio.Future[None]) -> bool:
        """Wait for admission unless the stream settles first (a group failed); True if admitted."""
        acquire = asyncio.ensure_future(admission.acquire())
        await asyncio.wait({acquire, settled}, return_when=asyncio.FIRST_COMPLETED)
        if acquire.done():
            return True
        acquire.cancel()
        await asyncio.gather(acquire, return_exceptions=True)
        return False

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
        on a normal end and cancelled (and awaited, so their envs close) with the stream.
        A group that raises (the sink failed, or a bug escaped an episode) stops the
        admission of new groups and is raised once the others are cancelled.
        """
        running: set[asyncio.Task[None]] = set()
        failures: list[BaseException] = []
        admitting = True
        settled = asyncio.get_running_loop().create_future()  # every group finished, or one failed

        async def one(task: Task) -> None:
            group = await self.run_group(task, group_size, sampling, tags=tags() if tags else None)
            await sink(group)

        def finished(job: asyncio.Task[None]) -> None:  # the one callback per group (no gather over them)
            running.discard(job)
            if not job.cancelled() and job.exception() is not None:
                failures.append(job.exception())
            if (failures or not (admitting or running)) and not settled.done():
                settled.set_result(None)

        try:
            for task in tasks:
                if failures:
                    break
                if admission.allowed():
                    await admission.acquire()  # returns at once
                elif not await self._admitted(admission, settled):
                    break  # a group failed while the stream waited for admission
                if failures:
                    break
                job = asyncio.create_task(one(task))
                running.add(job)
                job.add_done_callback(finished)
            admitting = False
            if running and not failures:
                await settled
            if failures:
                raise failures[0]
        finally:
            pending = list(running)
            for job in pending:
                job.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
