"""An online stage's rollouts on Ray (`rollout.executor: ray`): the worker pool of one learner.

`open_pool` builds what every worker needs from the run (the learner's policy as a picklable
factory, each env by id, the store's URL, the episode limits) and starts a `RayRolloutPool`;
the stage then streams its groups through `pool.stream` instead of the in-process runners, and
the trainer reads them from the store exactly as before. `close_pool` ends the workers and
records the pool's counters in the summary (`summary["ray"][learner]`). The warm start and the
held-out evaluations stay in process.

Workers follow the learner's policy: a local policy's weights are snapshotted (between hot swaps,
under its swap lock) once per version and put in Ray's object store; an endpoint's workers only
take the version number, as the controller publishes each version to the server itself.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from safactory.data.group_writer import StoreTarget
from safactory.factory.context import RunContext
from safactory.factory.learner import Learner, provenance
from safactory.policy.local import LocalPolicy
from safactory.policy.served import ServedPolicy
from safactory.policy.weights import version_state
from safactory.sim.ray_executor import RayOptions, RayRolloutPool
from safactory.sim.ray_worker import EndpointPolicyFactory, LocalPolicyFactory, RegistryEnv, WorkerSetup


class LocalWeights:
    """A local policy's versions, as the workers follow them."""

    def __init__(self, policy: LocalPolicy) -> None:
        self.policy = policy

    def version(self) -> int:
        return self.policy.version

    def snapshot(self) -> tuple[int, dict[str, Any] | None]:
        with self.policy._lock:  # the weights and their version together, never halfway through a swap
            state = version_state(self.policy.model)
            return self.policy.version, {k: v.cpu() for k, v in state.items()}

    def served_model(self, version: int) -> str | None:
        return None  # the workers hold the weights themselves


class ServedWeights:
    """An endpoint's versions: workers take the number, the server has the weights."""

    def __init__(self, policy: ServedPolicy) -> None:
        self.policy = policy

    def version(self) -> int:
        return self.policy.version

    def snapshot(self) -> tuple[int, dict[str, Any] | None]:
        return self.policy.version, None

    def served_model(self, version: int) -> str | None:
        return self.policy.served_models.get(version)


def worker_setup(ctx: RunContext, learner: Learner) -> WorkerSetup:
    """What each rollout worker of `learner` is built from."""
    config, rollout, policy = ctx.config, ctx.config.rollout, learner.policy
    factory: Any
    if isinstance(policy, ServedPolicy):
        assert rollout.endpoint is not None
        factory = EndpointPolicyFactory(rollout.endpoint, rollout.endpoint_api_key_env, policy.version)
    else:
        factory = LocalPolicyFactory(
            copy.deepcopy(policy.model).cpu(),
            learner.chat,
            device=config.model.device,
            max_batch=rollout.max_batch,
            seed=config.seed,
            version=policy.version,
            prefix_cache_mb=rollout.prefix_cache_mb,
        )
    return WorkerSetup(
        policy=factory,
        # a registered env is built from its id in the worker; a risk suite's env travels as its factory
        envs={
            name: slot.entry.factory if name.startswith("risk:") else RegistryEnv(name)
            for name, slot in ctx.envs.items()
        },
        store=StoreTarget(ctx.store.url, redact=config.redact),
        limits=ctx.limits,
        run_id=learner.run_id,
        seed=config.seed,
        concurrency=rollout.concurrency,
        keyed_store=ctx.store.key is not None,
    )


def open_pool(ctx: RunContext, learner: Learner) -> RayRolloutPool:
    """Start the learner's rollout workers on the configured cluster."""
    rollout = ctx.config.rollout
    options = RayOptions(
        address=rollout.ray_address,
        workers_per_node=rollout.workers_per_node,
        cpus_per_worker=rollout.cpus_per_worker,
        gpus_per_worker=rollout.gpus_per_worker,
        max_restarts=rollout.max_restarts,
        groups_per_worker=max(1, math.ceil(rollout.concurrency / ctx.config.rl.group_size)),
    )
    policy = learner.policy
    weights = ServedWeights(policy) if isinstance(policy, ServedPolicy) else LocalWeights(policy)
    pool = RayRolloutPool(
        worker_setup(ctx, learner), options, weights=weights, provenance=lambda: provenance(ctx, learner)
    )
    pool.start()
    ctx.log(f"[{learner.name}] {len(pool.workers)} rollout workers on {pool.nodes} Ray nodes")
    return pool


def close_pool(ctx: RunContext, learner: Learner, pool: RayRolloutPool) -> None:
    """End the workers; their counters (groups, retries, workers lost) go into the summary."""
    ctx.summary.setdefault("ray", {})[learner.name] = pool.stats()
    pool.close()
