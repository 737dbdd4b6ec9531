import asyncio

import pytest
from sqlalchemy import text

from safactory.data.store import TrajectoryStore
from safactory.policy.base import SamplingParams
from safactory.sim.runner import RolloutRunner
from safactory.sim.agent import EpisodeLimits
from safactory.sim.envs.arith import ArithEnv


@pytest.fixture
def store(tmp_path):
    s = TrajectoryStore.in_dir(tmp_path)
    yield s
    s.close()


@pytest.fixture
def trajs(policy, arith_tasks):
    runner = RolloutRunner(ArithEnv, policy, limits=EpisodeLimits(max_tokens_per_turn=12), run_id="run-a")
    groups = asyncio.run(runner.run_groups(arith_tasks.tasks("train", 3), 2, SamplingParams(temperature=1.0)))
    return [t for g in groups for t in g]


def test_round_trip_keeps_every_field_and_token(store, trajs):
    assert store.add(trajs) == len(trajs)
    back = store.get([t.id for t in trajs])
    for original, loaded in zip(trajs, back, strict=True):
        assert loaded.model_dump() == original.model_dump()
        assert loaded.steps[0].trace is not None and loaded.steps[0].trace.completion_ids
        assert loaded.compute_hash() == loaded.content_hash


def test_ingest_is_idempotent_and_chained(store, trajs):
    store.add(trajs[:4])
    assert store.add(trajs) == len(trajs) - 4
    assert store.add(trajs) == 0
    stored = store.query(run_id="run-a")
    assert [t.id for t in stored] == [t.id for t in trajs]
    assert stored[0].prev_hash == ""
    assert all(b.prev_hash == a.content_hash for a, b in zip(stored, stored[1:], strict=False))


def test_hash_changes_when_content_changes(trajs):
    traj = trajs[0]
    before = traj.compute_hash()
    traj.steps[0].trace.completion_ids[0] += 1
    assert traj.compute_hash() != before
    traj.steps[0].trace.completion_ids[0] -= 1
    assert traj.compute_hash() == before
    traj.reward += 1.0
    assert traj.compute_hash() != before


def test_tampering_is_visible_on_read(store, trajs):
    store.add(trajs)
    with store.engine.begin() as conn:
        conn.execute(
            text("UPDATE trajectories SET body = replace(body, :old, :new) WHERE seq = 1"),
            {"old": '"reward":0.0', "new": '"reward":1.0'},
        )
    loaded = store.query(run_id="run-a")[0]
    assert loaded.compute_hash() != loaded.content_hash


def test_prompts_are_stored_once_not_per_turn(store, trajs):
    store.add(trajs)
    with store.engine.connect() as conn:
        stored = conn.execute(text("SELECT sum(length(prompt_suffix)) FROM token_traces")).scalar_one()
    full = sum(len(s.trace.prompt_ids) * 4 for t in trajs for s in t.steps)
    multi_turn = any(len(t.steps) > 1 for t in trajs)
    assert stored < full if multi_turn else stored == full


def test_consumption_is_recorded(store, trajs):
    store.add(trajs)
    store.mark_consumed([trajs[0].id, trajs[1].id], step=7)
    left = store.query(run_id="run-a", unconsumed=True)
    assert {t.id for t in left} == {t.id for t in trajs[2:]}


def test_unknown_ids_and_schema_mismatch_are_clear_errors(store, tmp_path):
    with pytest.raises(KeyError):
        store.get(["nope"])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE safactory_meta SET value = '999' WHERE key = 'schema_version'"))
    with pytest.raises(RuntimeError, match="schema"):
        TrajectoryStore.in_dir(tmp_path)
