"""The Ray executor: rollout-worker actors across a cluster's nodes, driven by the controller.

`RayRolloutPool` is the controller's side of `rollout.executor: ray`. `start` connects to the
cluster (`ray.init(address)`; no address: a Ray instance of its own on this machine) and places
`workers_per_node` actors (`safactory.sim.ray_worker.RolloutWorker`, restartable up to
`max_restarts` times) on every node that has room, spread over the nodes. `stream` (the closed
loop) and `run_groups` (a fixed plan, `safactory rollout`) then keep a bounded number of groups in
flight, at most `groups_per_worker` per live worker: each group is handed to the least busy live
worker, and `ray.wait` returns the first to finish. The worker stores the group itself and hands
back its ids, which go to the caller's sink. Admission is the same `Admission` as in process:
a new group is submitted only while the staleness bound allows it.

A worker that dies (its process, or its node) fails its groups in flight with a Ray actor error:
each such group is submitted again, under the same group id, to another live worker (at most
`group_attempts` tries in all), so a retry can never store a duplicate (see `ray_worker`). The
dead worker is probed with a ping until it answers again (Ray restarts it where there is room) and
only then given groups again; if no worker is alive for `no_worker_timeout_s` the call fails.

The policy version travels with every job: `weights` (a `WeightsSource`) tells the version the
controller's policy is at and, once per version, a snapshot of its weights that is put in Ray's
object store; workers behind load it before they start the group.

Ray is imported only when a pool starts: the default install runs without it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from safactory.policy.base import SamplingParams
from safactory.sim.ray_worker import GroupJob, RolloutWorker, WorkerSetup
from safactory.sim.runner import Admission
from safactory.types import Task, uuid7

_T = TypeVar("_T")

GroupSink = Callable[[GroupJob, list[str]], Awaitable[None]]
"""Called with each finished group's job and its stored trajectory ids."""


def import_ray() -> Any:
    """The `ray` module, or a clear error where it is not installed."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("rollout.executor 'ray' needs Ray: pip install 'safactory[ray]'") from exc
    return ray


def worker_lost_errors() -> tuple[type[BaseException], ...]:
    """The Ray errors that mean "the worker (or its node) died", not "the group raised"."""
    ex = import_ray().exceptions
    return (
        ex.RayActorError,  # ActorDiedError, ActorUnavailableError
        ex.WorkerCrashedError,
        ex.NodeDiedError,
        ex.ObjectLostError,
        ex.OutOfMemoryError,
    )


def connect(options: RayOptions) -> bool:
    """Join the cluster at `options.address` (none: start Ray on this machine) unless this process is
    connected already; True when it connected here (and so is the one to `ray.shutdown()`)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    ray.init(
        address=options.address,
        namespace=options.namespace,
        log_to_driver=False,
        logging_level=logging.WARNING,
        include_dashboard=False if options.address is None else None,
    )
    return True


class GroupFailed(RuntimeError):
    """A group whose workers died on every try."""


class WorkerStartError(ValueError):
    """A rollout worker could not be built (a bad policy spec, an env or a store key missing on its node):
    a configuration error, raised by `RayRolloutPool.start` with the worker's own message."""


class WeightsSource(Protocol):
    """The controller's policy, as the workers follow it."""

    def version(self) -> int:
        """Its current version (cheap: asked before every submission)."""
        ...

    def snapshot(self) -> tuple[int, dict[str, Any] | None]:
        """Its version and a copy of its weights taken together (None: workers need only the number)."""
        ...

    def served_model(self, version: int) -> str | None:
        """The model name requests must give to sample `version` from its server (a vLLM or SGLang LoRA
        version is a model of its own), or None: the name the worker's endpoint spec says."""
        ...


@dataclass(frozen=True)
class RayOptions:
    """Where and how the workers run (`rollout.ray_address`, `rollout.workers_per_node`, ...)."""

    address: str | None = None  # a running cluster ("HOST:PORT" or "auto"); None: start Ray here
    workers_per_node: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_restarts: int = 3
    group_attempts: int = 3  # tries of a group whose worker died, the first included
    groups_per_worker: int = 8  # groups in flight on one worker
    start_timeout_s: float = 300.0
    no_worker_timeout_s: float = 300.0
    namespace: str = "safactory"
    poll_s: float = 0.2  # how often a controller waiting on its groups looks at admission and lost workers

    def __post_init__(self) -> None:
        if self.workers_per_node < 1 or self.groups_per_worker < 1 or self.group_attempts < 1:
            raise ValueError("workers_per_node, groups_per_worker and group_attempts must be >= 1")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0 or self.max_restarts < 0:
            raise ValueError("cpus_per_worker, gpus_per_worker and max_restarts must be >= 0")


@dataclass
class _Worker:
    index: int
    handle: Any
    ready: bool = False
    in_flight: int = 0
    lost: int = 0  # times it died under its groups
    probe: Any = None  # the ObjectRef of a ping in flight
    next_probe: float = 0.0
    failed_probes: int = 0


class RayRolloutPool:
    """Rollout-worker actors and the controller loop that feeds them; see the module docstring."""

    def __init__(
        self,
        setup: WorkerSetup,
        options: RayOptions,
        *,
        weights: WeightsSource | None = None,
        provenance: Callable[[], dict[str, Any]] | None = None,
        name: str = "",
    ) -> None:
        self.setup = setup
        self.options = options
        self.weights = weights
        self.provenance = provenance
        self.name = name or setup.run_id
        self.workers: list[_Worker] = []
        self.nodes = 0
        self.groups = 0
        self.retries = 0
        self.recovered: list[str] = []  # groups finished on another try after their worker died
        self._retrying: set[str] = set()  # groups whose worker died, not finished yet
        self._probes: dict[Any, _Worker] = {}
        self._owns_ray = False
        self._setup_ref: Any = None
        self._cached: tuple[int, Any] | None = None
        self._snapshot: asyncio.Lock | None = None
        self._none_since: float | None = None

    # ---- the workers ----------------------------------------------------------------
    def start(self) -> RayRolloutPool:
        """Connect to Ray, place the workers and wait until they answer (their setup errors are raised)."""
        ray = import_ray()
        opts = self.options
        self._owns_ray = connect(opts)
        nodes = [n for n in ray.nodes() if n.get("Alive") and self._fits(n.get("Resources", {}))]
        self.nodes = len(nodes)
        actor = ray.remote(RolloutWorker)
        # put once and held by the pool: a restarted worker is built again from the same object
        self._setup_ref = ray.put(self.setup)
        for i in range(max(1, opts.workers_per_node * self.nodes)):
            handle = actor.options(
                name=f"rollout-{self.name}-{i}",
                namespace=opts.namespace,
                num_cpus=opts.cpus_per_worker,
                num_gpus=opts.gpus_per_worker,
                max_restarts=opts.max_restarts,
                max_task_retries=0,  # the controller retries a lost group itself, on any live worker
                scheduling_strategy="SPREAD",
            ).remote(self._setup_ref, i)
            self.workers.append(_Worker(i, handle))
        pings = {w.handle.ping.remote(): w for w in self.workers}
        # the first to answer starts the run; the others join as they answer (a worker that Ray cannot
        # place yet, say on a node that died, must not hold the run up)
        ready, rest = ray.wait(list(pings), num_returns=1, timeout=opts.start_timeout_s)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=min(opts.start_timeout_s, 30.0))[0]
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as exc:
                self.close()
                text = str(exc).strip()
                reason = text.splitlines()[-1] if text else repr(exc)  # the last line of the worker's traceback
                raise WorkerStartError(f"a rollout worker could not start: {reason}") from exc
            pings[ref].ready = True
        for ref, worker in pings.items():
            if not worker.ready:  # not placed yet (no room): it joins once its ping answers
                worker.probe = ref
                self._probes[ref] = worker
        if not any(w.ready for w in self.workers):
            self.close()
            raise RuntimeError(f"no rollout worker started within {opts.start_timeout_s} s")
        return self

    def _fits(self, resources: dict[str, float]) -> bool:
        opts = self.options
        return resources.get("CPU", 0.0) >= opts.cpus_per_worker and resources.get("GPU", 0.0) >= opts.gpus_per_worker

    def close(self) -> None:
        """Close the workers' stores, end the actors, and Ray itself if this pool started it."""
        ray = import_ray()
        closing = [w.handle.close.remote() for w in self.workers if w.ready]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=30)
        for worker in self.workers:
            try:
                ray.kill(worker.handle, no_restart=True)
            except Exception:  # already gone
                pass
        self.workers, self._probes, self._setup_ref, self._cached = [], {}, None, None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def policy_identity(self) -> dict[str, Any]:
        """What a live worker says of its policy: its version and weights hash ({} with no live worker)."""
        ray = import_ray()
        for worker in self.workers:
            if worker.ready:
                return dict(ray.get(worker.handle.policy_identity.remote(), timeout=self.options.start_timeout_s))
        return {}

    def stats(self) -> dict[str, Any]:
        """Nodes, workers (live and lost), groups finished and groups retried after a worker died."""
        return {
            "nodes": self.nodes,
            "workers": len(self.workers),
            "workers_live": sum(w.ready for w in self.workers),
            "workers_lost": sum(w.lost for w in self.workers),
            "groups": self.groups,
            "groups_retried": self.retries,
            "groups_recovered": list(self.recovered),
            "groups_given_up": sorted(self._retrying),  # lost with their worker, never tried again
        }

    # ---- what the callers drive -------------------------------------------------------
    async def stream(
        self,
        env: str,
        tasks: Iterator[Task],
        group_size: int,
        sampling: SamplingParams,
        admission: Admission,
        sink: GroupSink,
        *,
        tags: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """Like `RolloutRunner.stream`: admit groups of `tasks` under `admission`, each played and stored
        by a worker; `sink` gets each finished group's ids. Runs until cancelled or `tasks` ends."""

        def build(task: Task) -> GroupJob:
            return self._job(env, task, group_size, sampling, 0, "rollout", tags() if tags else {})

        await self._drive(tasks, build, admission, sink)

    async def run_groups(
        self,
        env: str,
        planned: Iterable[tuple[Task, int, int]],
        sampling: SamplingParams,
        sink: GroupSink,
        *,
        kind: str = "rollout",
        tags: dict[str, Any] | None = None,
    ) -> None:
        """Play the planned groups (task, size, first member index) and pass each finished one to `sink`."""

        def build(item: tuple[Task, int, int]) -> GroupJob:
            task, size, first = item
            return self._job(env, task, size, sampling, first, kind, dict(tags or {}))

        await self._drive(iter(planned), build, None, sink)

    def _job(
        self, env: str, task: Task, size: int, sampling: SamplingParams, first: int, kind: str, tags: dict[str, Any]
    ) -> GroupJob:
        provenance = self.provenance() if self.provenance else {}
        return GroupJob(env, task, uuid7(), size, sampling, first, kind, tags, provenance)

    # ---- the controller loop ----------------------------------------------------------
    async def _drive(
        self,
        items: Iterator[_T],
        build: Callable[[_T], GroupJob],
        admission: Admission | None,
        sink: GroupSink,
    ) -> None:
        """Submit admitted groups while a live worker has room, settle those that finish, retry lost ones."""
        ray = import_ray()
        flying: dict[Any, tuple[GroupJob, _Worker, int]] = {}
        again: list[tuple[GroupJob, int]] = []
        upcoming: _T | None = None
        exhausted = False
        try:
            while True:
                while (worker := self._free_worker()) is not None:
                    if again:
                        job, attempt = again.pop(0)
                    else:
                        if upcoming is None and not exhausted:
                            upcoming = next(items, None)
                            exhausted = upcoming is None
                        if upcoming is None:
                            break
                        if admission is not None:
                            if not admission.allowed() and flying:
                                break  # wait for groups to finish (and the trainer to move on)
                            await admission.acquire()  # at once, or (nothing in flight) when allowed
                        job, attempt, upcoming = build(upcoming), 1, None
                    flying[await self._submit(job, worker)] = (job, worker, attempt)
                if not flying and not again and upcoming is None and exhausted:
                    return
                await self._settle(flying, again, sink)
        finally:
            # groups still in flight or waiting for a retry when the caller stops are not lost: cancelled
            self._retrying -= {job.group_id for job, _, _ in flying.values()} | {job.group_id for job, _ in again}
            for ref, (_, worker, _) in flying.items():
                worker.in_flight -= 1
                try:
                    ray.cancel(ref)  # the worker cancels the group's episodes (each closes its env)
                except Exception:  # the worker is gone already
                    pass

    def _free_worker(self) -> _Worker | None:
        """The live worker with the fewest groups in flight, if it has room for one more."""
        live = [w for w in self.workers if w.ready and w.in_flight < self.options.groups_per_worker]
        return min(live, key=lambda w: w.in_flight) if live else None

    async def _submit(self, job: GroupJob, worker: _Worker) -> Any:
        if self.weights is not None:
            version, ref = await self._current_weights()
            job = replace(job, version=version, weights=ref, model=self.weights.served_model(version))
        worker.in_flight += 1
        return worker.handle.run_group.remote(job)

    async def _current_weights(self) -> tuple[int, Any]:
        """The policy's version and its weights in the object store: put there once per version."""
        assert self.weights is not None
        if self._cached is None or self._cached[0] != self.weights.version():
            if self._snapshot is None:
                self._snapshot = asyncio.Lock()
            async with self._snapshot:
                if self._cached is None or self._cached[0] != self.weights.version():
                    version, state = await asyncio.to_thread(self.weights.snapshot)
                    ref = import_ray().put(state) if state is not None else None
                    self._cached = (version, ref)
        return self._cached

    async def _settle(
        self, flying: dict[Any, tuple[GroupJob, _Worker, int]], again: list[tuple[GroupJob, int]], sink: GroupSink
    ) -> None:
        """Wait (at most `poll_s`) for groups and probes; store results, queue retries, revive workers."""
        ray = import_ray()
        self._probe_lost()
        refs = [*flying, *self._probes]
        if not refs:
            await asyncio.sleep(self.options.poll_s)
            return
        ready, rest = await asyncio.to_thread(ray.wait, refs, num_returns=1, timeout=self.options.poll_s)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        for ref in ready:
            if ref in self._probes:
                self._probed(ref)
            elif ref in flying:
                job, worker, attempt = flying.pop(ref)
                worker.in_flight -= 1
                ids = self._outcome(ref, job, worker, attempt, again)
                if ids is not None:
                    self.groups += 1
                    if job.group_id in self._retrying:
                        self._retrying.discard(job.group_id)
                        self.recovered.append(job.group_id)
                    await sink(job, ids)

    def _outcome(
        self, ref: Any, job: GroupJob, worker: _Worker, attempt: int, again: list[tuple[GroupJob, int]]
    ) -> list[str] | None:
        """The group's ids; None when its worker died and it was queued to run again."""
        ray = import_ray()
        try:
            return list(ray.get(ref))
        except worker_lost_errors() as exc:
            self._lost(worker)
            if attempt >= self.options.group_attempts:
                raise GroupFailed(f"group {job.group_id} lost its worker {attempt} times; last: {exc}") from exc
            self.retries += 1
            self._retrying.add(job.group_id)
            again.append((job, attempt + 1))
            return None
        except ray.exceptions.RayTaskError as exc:  # the group itself raised (a bug, a store failure)
            raise exc.as_instanceof_cause() from None

    def _lost(self, worker: _Worker) -> None:
        if worker.ready:
            worker.ready = False
            worker.lost += 1
            worker.failed_probes = 0
            worker.next_probe = time.monotonic()

    def _probe_lost(self) -> None:
        """Ping lost workers whose turn has come; fail when none has been alive for too long."""
        now = time.monotonic()
        for worker in self.workers:
            if not worker.ready and worker.probe is None and now >= worker.next_probe:
                worker.probe = worker.handle.ping.remote()
                self._probes[worker.probe] = worker
        if any(w.ready for w in self.workers):
            self._none_since = None
        elif self._none_since is None:
            self._none_since = now
        elif now - self._none_since > self.options.no_worker_timeout_s:
            raise RuntimeError(f"no rollout worker has been alive for {self.options.no_worker_timeout_s} s")

    def _probed(self, ref: Any) -> None:
        worker = self._probes.pop(ref)
        worker.probe = None
        try:
            import_ray().get(ref)
        except Exception:  # still dead or restarting: ask again later, less and less often
            worker.failed_probes += 1
            worker.next_probe = time.monotonic() + min(0.5 * 2**worker.failed_probes, 10.0)
            return
        worker.ready = True
