"""A rollout worker reuses the instances of a reusable env across episodes (`safactory.sim.env_pool`).

The worker class is driven directly (no Ray: the pool lives in the worker's own process either way),
storing into SQLite. Checked: a reusable built-in env is built fewer times than episodes are played
and every episode equals the one a fresh instance plays; an instance whose episode ended in an error
or a timeout is closed and never plays again; an env that is not reusable gets an instance per episode;
the worker closes its idle instances when it stops.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from safactory.data.group_writer import StoreTarget
from safactory.data.store import TrajectoryStore
from safactory.policy.base import SamplingParams
from safactory.sim.agent import EpisodeLimits
from safactory.sim.env import EnvSpec
from safactory.sim.envs.arith import SPEC as ARITH_SPEC
from safactory.sim.envs.arith import ArithEnv, ArithExpert, ArithTasks
from safactory.sim.ray_worker import GroupJob, RolloutWorker, WorkerSetup
from safactory.sim.registry import default_registry
from safactory.sim.runner import StartRetry
from safactory.types import Message, StepResult, Task, Trajectory, uuid7

GROUP = 2  # members per group, played at once: the worker needs this many instances at most


class Counted:
    """An env factory that counts the instances it builds."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory
        self.built: list[Any] = []

    def __call__(self) -> Any:
        env = self.factory()
        self.built.append(env)
        return env


def _play(url: str, env: str, factory: Any, policy: Any, tasks: list[Task], group_ids: list[str], **setup: Any):
    """Play one group per task, one group after the other, on one worker storing into `url`; the
    stored trajectories in member order, and the worker's ping after its last group."""
    TrajectoryStore(url).create_run("r", {})
    worker = RolloutWorker(
        WorkerSetup(
            policy=lambda index: policy,
            envs={env: factory},
            store=StoreTarget(url, redact=False),
            limits=EpisodeLimits(max_turns=6, max_tokens_per_turn=64, env_timeout_s=0.5),
            run_id="r",
            retry=StartRetry(attempts=1),
            **setup,
        ),
        0,
    )
    sampling = SamplingParams(temperature=0.0)

    async def run() -> tuple[list[list[str]], dict[str, Any]]:
        ids = [
            await worker.run_group(GroupJob(env, t, g, GROUP, sampling)) for t, g in zip(tasks, group_ids, strict=True)
        ]
        ping = await worker.ping()
        await worker.close()
        return ids, ping

    ids, ping = asyncio.run(run())
    store = TrajectoryStore(url)
    by_id = {t.id: t for t in store.query(run_id="r")}
    store.close()
    return [by_id[i] for group in ids for i in group], ping


def _episode(t: Trajectory) -> dict[str, Any]:
    """What an episode played: everything stored but its clock times and hashes."""
    return t.model_dump(exclude={"started_at", "duration_s", "content_hash", "prev_hash"})


@pytest.mark.parametrize("env", ["arith", "maze", "ops"])
def test_a_reusable_env_plays_its_episodes_on_fewer_instances_with_the_same_results(env, tmp_path):
    entry = default_registry().get(env)
    assert entry.spec is not None and entry.spec.reusable
    tasks = entry.tasks().tasks("train", 4)
    group_ids = [uuid7() for _ in tasks]
    pooled, fresh = Counted(entry.factory), Counted(entry.factory)
    kept, kept_ping = _play(f"sqlite:///{tmp_path / 'a.db'}", env, pooled, entry.expert(), tasks, group_ids)
    new, new_ping = _play(f"sqlite:///{tmp_path / 'b.db'}", env, fresh, entry.expert(), tasks, group_ids, env_pool=0)
    episodes = len(tasks) * GROUP
    assert len(kept) == len(new) == episodes
    assert len(fresh.built) == episodes  # no pool: an instance per episode, as in process
    built = len(pooled.built)
    assert 1 <= built <= GROUP  # the groups after the first play on the first group's instances
    assert kept_ping["envs_built"] == built and kept_ping["env_reuses"] == episodes - built
    assert new_ping["env_reuses"] == 0
    assert all(t.termination in ("terminated", "truncated", "max_turns") for t in kept)
    assert [_episode(t) for t in kept] == [_episode(t) for t in new]  # a used instance plays as a fresh one


class Tripwire(ArithEnv):
    """Arith that raises in a step of a task marked `boom`, hangs in a step of one marked `hang`, and
    records which instance played which task and whether it was closed."""

    spec = ArithEnv.spec

    def __init__(self) -> None:
        super().__init__()
        self.played: list[str] = []
        self.closed = False

    async def on_reset(self, task: Task) -> list[Message]:
        assert not self.closed
        self.played.append(task.id)
        return await super().on_reset(task)

    async def step(self, action: Message) -> StepResult:
        assert self.task is not None
        if self.task.data.get("boom"):
            raise RuntimeError("boom")
        if self.task.data.get("hang"):
            await asyncio.sleep(5)
        return await super().step(action)

    async def close(self) -> None:
        self.closed = True


class Disposable(Tripwire):
    spec = EnvSpec(id="arith", version=ARITH_SPEC.version, tools=ARITH_SPEC.tools, max_turns=4)


def _marked(task: Task, mark: str) -> Task:
    return task.model_copy(update={"id": f"{task.id}/{mark}", "data": {**task.data, mark: True}})


def test_an_instance_whose_episode_failed_or_timed_out_is_closed_and_never_played_again(tmp_path):
    a, b, c, d, e = ArithTasks().tasks("train", 5)
    tasks = [a, _marked(b, "boom"), c, _marked(d, "hang"), e]
    factory = Counted(Tripwire)
    played, ping = _play(
        f"sqlite:///{tmp_path / 's.db'}", "arith", factory, ArithExpert(), tasks, [uuid7() for _ in tasks]
    )
    ends = ["terminated", "env_error", "terminated", "env_timeout", "terminated"]
    assert [t.termination for t in played] == [end for end in ends for _ in range(GROUP)]
    failing = {f"{b.id}/boom", f"{d.id}/hang"}
    for env in factory.built:  # an instance whose episode failed played nothing after it
        assert not any(task in failing for task in env.played[:-1]), env.played
    assert max(len(env.played) for env in factory.built) > 1  # instances were reused (up to a failure)
    assert any(env.played[-1] == f"{b.id}/boom" and len(env.played) > 1 for env in factory.built)
    assert len(factory.built) == len(played) - ping["env_reuses"] < len(played)
    assert factory.built[-1].played[-1] == e.id  # the last group's instance was idle when the worker stopped...
    assert all(env.closed for env in factory.built)  # ...and closed then; the failed ones were closed at once


def test_an_env_that_is_not_reusable_gets_an_instance_per_episode(tmp_path):
    tasks = ArithTasks().tasks("train", 3)
    factory = Counted(Disposable)
    played, ping = _play(
        f"sqlite:///{tmp_path / 's.db'}", "arith", factory, ArithExpert(), tasks, [uuid7() for _ in tasks]
    )
    assert all(t.success for t in played)
    assert len(factory.built) == len(played) == 6
    assert all(len(env.played) == 1 and env.closed for env in factory.built)
    assert ping["env_reuses"] == 0
