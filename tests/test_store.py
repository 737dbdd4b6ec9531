import asyncio
import json

import pytest
from sqlalchemy import text

from safactory.data.codec import content_hash
from safactory.data.store import TrajectoryStore
from safactory.policy.base import SamplingParams
from safactory.sim.agent import EpisodeLimits
from safactory.sim.envs.arith import ArithEnv
from safactory.sim.runner import RolloutRunner


@pytest.fixture
def store(store_url):
    s = TrajectoryStore(store_url)
    s.create_run("run-a", {"note": "test"})
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
        assert content_hash(loaded) == loaded.content_hash


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
    before = content_hash(traj)
    traj.steps[0].trace.completion_ids[0] += 1
    assert content_hash(traj) != before
    traj.steps[0].trace.completion_ids[0] -= 1
    assert content_hash(traj) == before
    traj.reward += 1.0
    assert content_hash(traj) != before


def test_prompts_are_stored_once_not_per_turn(store, trajs):
    store.add(trajs)
    with store.engine.connect() as conn:
        stored = conn.execute(text("SELECT sum(length(prompt_suffix)) FROM token_traces")).scalar_one()
    full = sum(len(s.trace.prompt_ids) * 4 for t in trajs for s in t.steps)
    multi_turn = any(len(t.steps) > 1 for t in trajs)
    assert stored < full if multi_turn else stored == full


def test_consumption_is_exactly_once_and_released_after_a_lost_step(store, trajs):
    store.add(trajs)
    store.mark_consumed([trajs[0].id, trajs[1].id], step=7, consumer="run-a")
    store.mark_consumed([trajs[2].id], step=8, consumer="run-a")
    left = store.query(run_id="run-a", unconsumed_by="run-a")
    assert {t.id for t in left} == {t.id for t in trajs[3:]}
    with pytest.raises(ValueError, match="already consumed"):
        store.mark_consumed([trajs[1].id, trajs[4].id], step=9, consumer="run-a")
    assert store.consumed_step(trajs[4].id, "run-a") is None  # the failed call recorded nothing
    assert len(store.query(unconsumed_by="another-trainer")) == len(trajs)  # consumption is per consumer
    # a trainer that resumes from the checkpoint of step 7 gets step 8's data again
    assert store.release_consumed_after("run-a", 7) == 1
    assert {t.id for t in store.query(run_id="run-a", unconsumed_by="run-a")} == {t.id for t in trajs[2:]}


def test_checkpoints_and_lineage(store, trajs):
    store.add(trajs)
    store.add_checkpoint("run-a", 0, weights_hash="h0", train_step=0)
    store.mark_consumed([trajs[0].id], step=1, consumer="run-a")
    store.add_checkpoint("run-a", 1, weights_hash="h1", train_step=1, parent_version=0)
    store.mark_consumed([trajs[1].id], step=2, consumer="run-a")
    store.add_checkpoint("run-a", 2, weights_hash="h2", train_step=2, parent_version=1)
    assert [c["version"] for c in store.checkpoints("run-a")] == [0, 1, 2]
    assert store.lineage("run-a", 1) == [trajs[0].id]
    assert set(store.lineage("run-a", 2)) == {trajs[0].id, trajs[1].id}


def test_verdicts_and_scores_attach_to_trajectories(store, trajs):
    store.add(trajs)
    store.add_verdict(trajs[0].id, judge="rules", judge_version="1", unsafe=True, severity=0.5, reasons=["x"])
    store.add_score(trajs[0].id, judge="rules", name="quality", value=0.25)
    (verdict,) = store.verdicts(trajs[0].id)
    assert verdict["unsafe"] and verdict["reasons"] == ["x"] and verdict["judge_version"] == "1"


def test_adding_to_an_unknown_run_is_a_clear_error(store, trajs):
    trajs[0].run_id = "nope"
    with pytest.raises(KeyError, match="create_run"):
        store.add(trajs[:1])
    assert store.count() == 0


def test_unknown_ids_and_schema_mismatch_are_clear_errors(store):
    with pytest.raises(KeyError):
        store.get(["nope"])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE safactory_meta SET value = '999' WHERE key = 'schema_version'"))
    with pytest.raises(RuntimeError, match="schema"):
        TrajectoryStore(store.url)


def test_creating_a_run_twice_keeps_the_first_and_free_text_has_no_length_limit(store, trajs):
    store.create_run("twice", {"a": 1})
    store.create_run("twice", {"a": 2})  # e.g. two processes starting the same run
    assert json.loads(store.run_info("twice")["config"]) == {"a": 1}
    long = trajs[0].model_copy(
        update={"id": "long", "run_id": "twice", "env_id": "mcp:" + "x" * 300, "env_version": "v" * 80}
    )
    store.add([long])
    back = store.get(["long"])[0]
    assert back.env_id == long.env_id and back.env_version == long.env_version


def test_a_non_finite_reward_is_refused_with_its_trajectory_named(store, trajs):
    bad = trajs[0].model_copy(update={"id": "nan-reward", "reward": float("nan")})
    with pytest.raises(ValueError, match="nan-reward"):
        store.add([bad, trajs[1]])
    assert store.count() == 0
