"""Env instances kept across episodes, for the envs that allow it (`EnvSpec.reusable`).

In process every episode builds its env and closes it at the end (`safactory.sim.runner`). A
rollout worker (`safactory.sim.ray_worker`) plays many episodes of the same few envs for as long as
it lives, so it keeps the instances of a reusable env in an `EnvPool` and plays the next episode on
one whose last episode ended: what building the env costs (a sandbox, a connection, a loaded data
set) is paid once per instance, not once per episode.

An env whose spec says `reusable` promises that `reset` re-initialises all of its state, so an
episode played on a used instance is the episode a fresh one would play. Only an episode that ended
cleanly (`CLEAN_ENDS`: the env or one of the episode's limits ended it) gives its instance back;
after any error (at reset, in a step, in the policy), a timeout or a cancellation the instance is
closed and dropped, exactly as without a pool. An env that is not reusable is closed after every
episode, as in process. The pool keeps at most `size` idle instances (a returned one beyond that is
closed); `close` closes the idle ones.

`PooledRunner` is the `RolloutRunner` whose episodes take their env from a pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from safactory.policy.base import Policy, SamplingParams
from safactory.sim.agent import bounded
from safactory.sim.env import Environment, EnvSpec
from safactory.sim.runner import RolloutRunner
from safactory.types import Message, Task, Trajectory

CLEAN_ENDS = frozenset({"terminated", "truncated", "max_turns", "token_limit"})
"""The terminations after which an instance may play again: the env or a limit ended the episode."""


class EnvPool:
    """Idle instances of one env, built by `factory`; at most `size` kept (0: none, every episode builds its own)."""

    def __init__(self, factory: Callable[[], Environment], size: int, close_timeout_s: float = 30.0) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, not {size}")
        self.factory = factory
        self.size = size
        self.close_timeout_s = close_timeout_s
        self.idle: list[Environment] = []
        self.built = 0  # instances built
        self.reuses = 0  # episodes played on an instance that had played before

    def acquire(self) -> Environment:
        """An idle instance (the one returned last), or a new one from the factory (which may raise)."""
        if self.idle:
            self.reuses += 1
            return self.idle.pop()
        env = self.factory()
        self.built += 1
        return env

    async def release(self, env: Environment, clean: bool) -> str | None:
        """Take the instance back after its episode: kept when the episode ended `clean`ly, the env is
        reusable and there is room; closed otherwise. Returns what closing it raised (repr), if it did."""
        if clean and env.spec.reusable and len(self.idle) < self.size:
            self.idle.append(env)
            return None
        return await self.retire(env)

    async def retire(self, env: Environment) -> str | None:
        """Close the instance (best effort, bounded); returns what closing raised (repr), if it did."""
        try:
            await bounded(env.close(), self.close_timeout_s)
        except Exception as exc:
            return repr(exc)
        return None

    async def close(self) -> None:
        """Close every idle instance."""
        idle, self.idle = self.idle, []
        for env in idle:
            await self.retire(env)


class _Lease:
    """An instance lent to one episode: its own `reset` and `step`, and a `close` that keeps it (the pool
    decides once the episode's end is known)."""

    __slots__ = ("env", "reset", "step")

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.reset: Callable[[Task, int], Any] = env.reset  # bound methods: the hot path pays no extra call
        self.step: Callable[[Message], Any] = env.step

    @property
    def spec(self) -> EnvSpec:
        return self.env.spec

    async def close(self) -> None:
        return None


class PooledRunner(RolloutRunner):
    """A `RolloutRunner` whose episodes take their env from `pool` and give it back when they end."""

    def __init__(self, pool: EnvPool, policy: Policy, **options: Any) -> None:
        super().__init__(pool.factory, policy, **options)
        self.pool = pool

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
        started = time.time()
        try:
            env = self.pool.acquire()
        except Exception as exc:
            return None, exc
        try:
            lease = _Lease(env)  # an Environment in all but name: its close gives the instance back
            traj, reset_error = await self._play(
                lease,  # type: ignore[arg-type]
                task,
                seed,
                group_id,
                task_hash,
                sampling,
                kind,
                tags,
                provenance,
                started,
            )
        except BaseException:  # cancelled (or a bug): the instance is in an unknown state
            await self.pool.retire(env)
            raise
        clean = reset_error is None and traj.termination in CLEAN_ENDS
        if (close_error := await self.pool.release(env, clean)) is not None:
            traj.tags["close_error"] = close_error  # as play_episode records it for an env it closes
        return traj, reset_error
