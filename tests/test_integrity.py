"""`verify` catches edited, deleted and swapped rows, and names the first bad trajectory."""

import asyncio

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from safactory.cli import app
from safactory.data.integrity import verify
from safactory.data.store import CorruptRecordError, TrajectoryStore
from safactory.policy.base import SamplingParams
from safactory.provenance import weights_hash
from safactory.sim.agent import EpisodeLimits
from safactory.sim.envs.arith import ArithEnv
from safactory.sim.runner import RolloutRunner


@pytest.fixture
def filled(store_url, policy, arith_tasks):
    store = TrajectoryStore(store_url)
    store.create_run("r1", {})
    runner = RolloutRunner(ArithEnv, policy, limits=EpisodeLimits(max_tokens_per_turn=10), run_id="r1")
    groups = asyncio.run(runner.run_groups(arith_tasks.tasks("train", 3), 2, SamplingParams(temperature=1.0)))
    trajs = [t for g in groups for t in g]
    store.add(trajs[:3])
    store.add(trajs[3:])
    yield store, trajs, store_url
    store.close()


def run_sql(store, sql, **params):
    with store.engine.begin() as conn:
        conn.execute(text(sql), params)


def cli_verify(url):
    return CliRunner().invoke(app, ["data", "verify", "--db", url])


def test_clean_store_verifies(filled):
    store, trajs, url = filled
    report = verify(store)
    assert report.ok and report.checked == len(trajs)
    result = cli_verify(url)
    assert result.exit_code == 0, result.output


def test_edited_row_is_named(filled):
    store, trajs, url = filled
    run_sql(store, "UPDATE trajectories SET reward = reward + 1 WHERE id = :i", i=trajs[2].id)
    report = verify(store)
    assert not report.ok and trajs[2].id in report.problems[0] and "modified" in report.problems[0]
    result = cli_verify(url)
    assert result.exit_code == 1 and trajs[2].id in result.output


def test_edited_tokens_and_steps_are_caught(filled):
    store, trajs, _ = filled
    run_sql(
        store,
        "UPDATE token_traces SET completion_ids = :b WHERE trajectory_id = :i",
        b=b"\x05\x00\x00\x00",
        i=trajs[1].id,
    )
    assert trajs[1].id in verify(store).problems[0]


def test_deleted_row_is_named(filled):
    store, trajs, url = filled
    run_sql(store, "DELETE FROM trajectories WHERE id = :i", i=trajs[3].id)
    problem = verify(store).problems[0]
    assert trajs[4].id in problem and "deleted or moved" in problem


def test_deleted_tail_is_caught(filled):
    store, trajs, _ = filled
    run_sql(store, "DELETE FROM trajectories WHERE id = :i", i=trajs[-1].id)
    assert "at its end" in verify(store).problems[0]


def test_swapped_rows_are_caught(filled):
    store, trajs, _ = filled
    seq = {r[0]: r[1] for r in store.engine.connect().execute(text("SELECT id, seq FROM trajectories"))}
    a, b = trajs[1].id, trajs[2].id
    run_sql(store, "UPDATE trajectories SET seq = -1 WHERE id = :a", a=a)
    run_sql(store, "UPDATE trajectories SET seq = :s WHERE id = :b", s=seq[a], b=b)
    run_sql(store, "UPDATE trajectories SET seq = :s WHERE id = :a", s=seq[b], a=a)
    problem = verify(store).problems[0]
    assert b in problem and "does not follow" in problem  # b now comes first, out of order


def test_weights_hash_sees_every_parameter(tiny):
    model = tiny[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = weights_hash(state)
    assert weights_hash(state) == before
    next(iter(state.values())).view(-1)[0] += 1e-3
    assert weights_hash(state) != before


def test_a_store_being_written_to_verifies(filled):
    """Trajectories committed while the chain is walked belong to a later head, not to a broken chain."""
    store, trajs, _ = filled
    more = [t.model_copy(update={"id": f"late-{i}", "content_hash": "", "prev_hash": ""}) for i, t in enumerate(trajs)]
    added: list[int] = []

    def write_meanwhile(_: int) -> None:
        if not added:
            added.append(store.add(more[:2]))

    report = verify(store, progress=write_meanwhile)
    assert added == [2] and report.ok, report.problems
    assert report.checked == len(trajs)
    assert verify(store).ok and verify(store).checked == len(trajs) + 2


def test_unreadable_rows_and_orphaned_runs_are_reported(filled):
    store, trajs, _ = filled
    store.create_run("r2", {})
    store.add(
        [t.model_copy(update={"id": "other", "run_id": "r2", "content_hash": "", "prev_hash": ""}) for t in trajs[:1]]
    )
    run_sql(store, "UPDATE trajectories SET meta = '{not json' WHERE id = :i", i=trajs[1].id)
    report = verify(store)  # the damaged run is reported and the next run is still checked
    assert len(report.problems) == 1 and trajs[1].id in report.problems[0] and "read" in report.problems[0]
    assert report.runs == 2 and report.checked >= 1  # r2's trajectory
    with pytest.raises(CorruptRecordError, match=trajs[1].id):
        store.get([trajs[1].id])
    run_sql(store, "DELETE FROM runs WHERE id = 'r2'")
    report = verify(store)
    assert any("r2" in p and "no recorded run" in p for p in report.problems), report.problems


def test_negative_zero_survives_the_round_trip(filled):
    """SQLite reads a stored REAL -0.0 back as 0.0; the hash must not depend on the sign of zero."""
    store, trajs, _ = filled
    traj = trajs[0].model_copy(update={"id": "neg-zero", "content_hash": "", "prev_hash": ""}, deep=True)
    traj.reward = -0.0
    traj.steps[0].reward = -0.0
    store.add([traj])
    assert store.get(["neg-zero"])[0].steps[0].reward == 0.0
    assert verify(store).ok
