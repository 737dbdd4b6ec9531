"""A rollout worker: the runner, its environments and a copy of the policy in one process (a Ray actor).

The controller (`safactory.sim.ray_executor`) hands a worker one group at a time, as a `GroupJob`
(env, task, group id, size, sampling, tags, provenance, and the policy version it is to be sampled
by). The worker plays it with the same `RolloutRunner` as in process, writes the finished group to
the store itself (its `GroupStore`: batched, one transaction per group or batch of groups) and
returns only the trajectory ids. Nothing in this file imports Ray: the controller wraps
`RolloutWorker` into an actor class, so the default install runs without it.

Idempotent by group id. The controller names every group; member i of group g is stored under
`member_id(g, i)`. A group retried after its first worker died therefore keeps its ids, and the store
(which skips ids it already holds, under a lock per run) can never hold it twice; a worker asked for
a group the store already holds complete returns its ids without playing it again (its first worker
died after the commit, before it could answer).

Weights. A job carries the version it is to be sampled by and the object-store reference of those
weights (inside the job, so Ray hands over the reference, not the tensors); a worker behind that
version loads them before it starts the group, and never goes back to an older one. A worker that
Ray restarted after a crash starts from its setup's weights and catches up the same way. A policy
without weights of its own (an endpoint) only takes the version number.

Env instances. A worker keeps an `EnvPool` per env name for as long as it lives: an env whose spec
says `reusable` plays its next episode on an instance whose last episode ended cleanly, up to
`WorkerSetup.env_pool` idle instances per env (see `safactory.sim.env_pool`); `close` closes them.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from safactory.policy.base import Policy, SamplingParams
from safactory.provenance import weights_hash
from safactory.sim.agent import EpisodeLimits
from safactory.sim.env import Environment
from safactory.sim.env_pool import EnvPool, PooledRunner
from safactory.sim.runner import StartRetry
from safactory.types import Task, Trajectory

_MASK_62 = (1 << 62) - 1


def member_id(group_id: str, index: int) -> str:
    """The id of member `index` of group `group_id`: the same for every attempt at the group.

    UUIDv7-shaped: the group's millisecond time stamp (so ids stay roughly time-ordered), the
    version and variant bits, and 74 bits of sha256 over the group id and the index.
    """
    stamp = int(group_id.replace("-", "")[:12], 16)
    digest = int.from_bytes(hashlib.sha256(f"{group_id}:{index}".encode()).digest()[:10], "big")
    value = stamp << 80 | 0x7 << 76 | ((digest >> 62) & 0xFFF) << 64 | 0b10 << 62 | digest & _MASK_62
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def keyed(group: list[Trajectory], group_id: str) -> list[Trajectory]:
    """The group's trajectories under the group id and member ids its key gives them (in place)."""
    for i, traj in enumerate(group):
        traj.group_id = group_id
        traj.id = member_id(group_id, i)
    return group


class GroupStore(Protocol):
    """Where a worker writes its groups (`safactory.data.group_writer.GroupWriter`)."""

    async def put(self, group: list[Trajectory]) -> None:
        """Store the group; returns once it is durable. Ids already stored are skipped."""
        ...

    async def stored(self, group_id: str) -> list[str]:
        """The ids of the group's members already stored, in the order they were stored."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class GroupJob:
    """One group for a worker to play and store."""

    env: str
    task: Task
    group_id: str
    size: int
    sampling: SamplingParams
    first_index: int = 0
    kind: str = "rollout"
    tags: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    version: int | None = None  # the policy version to sample it with; None: the worker's own
    weights: Any = None  # the object-store reference of that version's weights, or None
    model: str | None = None  # the model name that version is served under (vLLM/SGLang LoRA), or None


@functools.cache
def registered_factory(env_id: str) -> Callable[[], Environment]:
    """The factory of a registered env, looked up once per process (the registry is built once)."""
    from safactory.sim.registry import default_registry

    return default_registry().get(env_id).factory


@dataclass(frozen=True)
class RegistryEnv:
    """An env factory by registered id, resolved in the worker (no env object travels)."""

    env_id: str

    def __call__(self) -> Environment:
        return registered_factory(self.env_id)()


@dataclass(frozen=True)
class LocalPolicyFactory:
    """A worker's own in-process copy of the learner's model (`LocalPolicy`), on `device`.

    Each worker samples with its own seed (the run's seed plus its index), so two workers never
    draw the same random stream."""

    model: Any  # a PreTrainedModel, on the CPU (it travels to the worker)
    chat: Any  # the ChatRenderer
    device: str = "cpu"
    max_batch: int = 256
    seed: int = 0
    version: int = 0
    prefix_cache_mb: float = 1024.0

    def __call__(self, index: int) -> Policy:
        from safactory.config import resolve_device
        from safactory.policy.local import LocalPolicy

        model = copy.deepcopy(self.model).to(resolve_device(self.device))
        return LocalPolicy(
            model,
            self.chat,
            max_batch=self.max_batch,
            seed=self.seed + 7919 * index,
            version=self.version,
            prefix_cache_mb=self.prefix_cache_mb,
        )


@dataclass(frozen=True)
class EndpointPolicyFactory:
    """A worker's client of an OpenAI-compatible endpoint (the controller publishes the versions)."""

    spec: str
    api_key_env: str | None = None
    version: int = 0

    def __call__(self, index: int) -> Policy:
        from safactory.policy.routing import endpoint_from_spec

        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        policy = endpoint_from_spec(self.spec, api_key=key)  # several servers: this worker routes among them
        policy.version = self.version
        return policy


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker is built from (plain data and picklable factories: it travels to the nodes).

    `policy` builds the worker's policy from its index; `envs` maps each env name to its factory;
    `store` opens the worker's `GroupStore`. `keyed_store`: the controller signs the store's chain
    heads with `SAFACTORY_STORE_KEY`, so every worker must have the same key in its environment.
    """

    policy: Callable[[int], Policy]
    envs: dict[str, Callable[[], Environment]]
    store: Callable[[], GroupStore]
    limits: EpisodeLimits
    run_id: str
    seed: int = 0
    concurrency: int = 64
    retry: StartRetry | None = None
    keyed_store: bool = False
    env_pool: int = 64  # idle instances of a reusable env kept per env name (0: a new instance per episode)


def _node_id() -> str:
    """The Ray node this process runs on ("" outside Ray: Ray is never imported, let alone started, here)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ""
    return str(ray.get_runtime_context().get_node_id())


class RolloutWorker:
    """The body of a rollout-worker actor: plays groups and stores them; see the module docstring."""

    def __init__(self, setup: WorkerSetup, index: int) -> None:
        if setup.keyed_store and not os.environ.get("SAFACTORY_STORE_KEY"):
            raise RuntimeError(
                "the controller signs the store with SAFACTORY_STORE_KEY but this worker's node has none: "
                "set the same key in the environment of every `ray start`"
            )
        self.setup = setup
        self.index = index
        self.node = _node_id()
        self.policy = setup.policy(index)
        self.store = setup.store()
        self.running = 0
        self.groups = 0
        self.reused = 0  # groups found already stored (a retry after the first worker committed)
        self._swap: asyncio.Lock | None = None
        self.pools: dict[str, EnvPool] = {}

    async def run_group(self, job: GroupJob) -> list[str]:
        """Play the job's group (unless the store already holds it), store it, return its ids in member order."""
        self.running += 1
        try:
            done = await self.store.stored(job.group_id)
            if len(done) == job.size:
                self.reused += 1
                return [member_id(job.group_id, i) for i in range(job.size)]
            await self._catch_up(job)
            group = await self._runner(job).run_group(
                job.task, job.size, job.sampling, kind=job.kind, tags=job.tags, first_index=job.first_index
            )
            await self.store.put(keyed(group, job.group_id))
            self.groups += 1
            return [t.id for t in group]
        finally:
            self.running -= 1

    def _pool(self, env: str) -> EnvPool:
        """The worker's pool of `env`'s instances (made on first use)."""
        pool = self.pools.get(env)
        if pool is None:
            setup = self.setup
            pool = self.pools[env] = EnvPool(setup.envs[env], setup.env_pool, setup.limits.env_timeout_s)
        return pool

    def _runner(self, job: GroupJob) -> PooledRunner:
        """A runner for the job's group: the worker's env pool, the setup's limits and retries, the job's provenance."""
        setup, policy, worker = self.setup, self.policy, {"index": self.index, "node": self.node}

        def provenance() -> dict[str, Any]:  # stamped at each episode's start, as in process
            stamp = {**job.provenance, "rollout_worker": worker}
            if job.version is not None:  # a policy that follows the controller's versions
                stamp["policy_version_at_start"] = getattr(policy, "version", job.version)
            return stamp

        return PooledRunner(
            self._pool(job.env),
            policy,
            limits=setup.limits,
            concurrency=setup.concurrency,
            run_id=setup.run_id,
            seed=setup.seed,
            provenance=provenance,
            retry=setup.retry,
        )

    async def _catch_up(self, job: GroupJob) -> None:
        """Load the job's policy version if this worker is behind it (never an older one)."""
        current = getattr(self.policy, "version", None)
        if job.version is None or current is None or current >= job.version:
            return
        if self._swap is None:
            self._swap = asyncio.Lock()
        async with self._swap:  # several groups may arrive with the same new version: load it once
            if self.policy.version >= job.version:  # type: ignore[attr-defined]
                return
            publish = getattr(self.policy, "publish", None)
            if job.weights is not None and publish is not None:
                await publish(await job.weights, job.version)
            else:
                if job.model is not None:  # an endpoint whose server serves each version under a name of its own
                    self.policy.model = job.model  # type: ignore[attr-defined]
                self.policy.version = job.version  # type: ignore[attr-defined]

    async def ping(self) -> dict[str, Any]:
        """The worker's state: where it runs, its policy version and its counters."""
        return {
            "index": self.index,
            "pid": os.getpid(),
            "node": self.node,
            "version": getattr(self.policy, "version", None),
            "running": self.running,
            "groups": self.groups,
            "reused": self.reused,
            "envs_built": sum(p.built for p in self.pools.values()),
            "env_reuses": sum(p.reuses for p in self.pools.values()),
        }

    async def policy_identity(self) -> dict[str, Any]:
        """The worker's policy: its version, and a hash of its weights ("" for a policy without weights)."""
        model = getattr(self.policy, "model", None)
        digest = weights_hash(model.state_dict()) if model is not None and hasattr(model, "state_dict") else ""
        return {"version": getattr(self.policy, "version", None), "weights_hash": digest}

    async def close(self) -> None:
        pools, self.pools = list(self.pools.values()), {}
        for pool in pools:
            await pool.close()
        await self.store.close()
        closing = getattr(self.policy, "close", None)
        if closing is not None:
            result = closing()
            if asyncio.iscoroutine(result):
                await result
