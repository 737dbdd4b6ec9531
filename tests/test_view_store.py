"""`safactory view`'s reads of the store, on SQLite and PostgreSQL: every filter of the trajectories
page against the same rows filtered in Python, keyset pages walking every match once in both
directions, and one trajectory's integrity, chain and lineage."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from safactory.data.store import TrajectoryStore
from safactory.types import Message, Step, Task, TokenTrace, ToolCall, Trajectory
from safactory.view.filters import FilterError, TrajectoryFilter
from safactory.view.queries import StoreReader

N = 240
KINDS = ("rollout", "eval", "redteam")


def _trajectory(run_id: str, i: int, rng: random.Random) -> Trajectory:
    kind = KINDS[i % 3]
    env = ("ops", "arith")[rng.random() < 0.5]
    task = Task(id=f"{env}/t{rng.randint(0, 9)}", env_id=env, split="train", prompt="p")
    version = rng.randint(0, 4)
    call = ToolCall(id=f"c{i}", name="read", arguments={"path": f"/f{i}"})
    trace = TokenTrace(prompt_ids=[5, 6, 7], completion_ids=[8, 9], logprobs=[-0.5, -2.0], policy_version=version)
    step = Step(
        index=0,
        action=Message(role="assistant", content="read", tool_calls=[call]),
        observation=[Message(role="tool", content="x", tool_call_id=f"c{i}")],
        reward=0.0,
        trace=trace,
    )
    tags: dict[str, Any] = {"risk_suite": ("alpha", "beta")[i % 2]} if kind == "redteam" else {}
    return Trajectory(
        run_id=run_id,
        kind=kind,
        task=task,
        env_id=env,
        steps=[step],
        reward=round(rng.uniform(-1, 1), 3),
        success=rng.random() < 0.4,
        error="boom" if rng.random() < 0.1 else None,
        tags=tags,
    )


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def filled(request, tmp_path_factory):
    """A store of N trajectories over two runs, with verdicts (unsafe, safe, unknown), consumption and
    checkpoints; and the same trajectories in insertion order with their verdict status."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('view') / 'store.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"v_{uuid.uuid4().hex[:12]}")
    store = TrajectoryStore(url)
    rng = random.Random(7)
    runs = ("run-a", "run-b")
    for run in runs:
        store.create_run(run, {"envs": [{"id": "ops"}, {"id": "arith"}]})
    trajs = [_trajectory(runs[int(rng.random() < 0.3)], i, rng) for i in range(N)]
    for start in range(0, N, 50):  # several transactions: the runs' rows interleave
        store.add(trajs[start : start + 50])
    status: dict[str, str | None] = {}
    verdicts = []
    for i, traj in enumerate(trajs):
        pick = i % 5
        if pick == 0:
            verdicts.append({"trajectory_id": traj.id, "judge": "rules", "judge_version": "1", "unsafe": True})
            status[traj.id] = "unsafe"
        elif pick in (1, 2):
            verdicts.append({"trajectory_id": traj.id, "judge": "rules", "judge_version": "1", "unsafe": False})
            status[traj.id] = "safe"
        elif pick == 3:  # an undecided judge: unsafe False, status unknown in meta
            meta = {"status": "unknown"}
            verdicts.append(
                {"trajectory_id": traj.id, "judge": "llm", "judge_version": "1", "unsafe": False, "meta": meta}
            )
            status[traj.id] = "unknown"
        else:
            status[traj.id] = None
    store.add_verdicts(verdicts)
    consumed = [t.id for t in trajs if t.run_id == "run-a" and t.kind == "rollout"][:20]
    store.mark_consumed(consumed[:10], step=1, consumer="run-a")
    store.mark_consumed(consumed[10:], step=2, consumer="run-a")
    for version, step in ((0, 0), (1, 1), (2, 2)):
        store.add_checkpoint("run-a", version, weights_hash=f"h{version}", train_step=step)
    yield store, trajs, status, consumed
    store.close()


def _matches(t: Trajectory, f: TrajectoryFilter, status: dict[str, str | None]) -> bool:
    """The filter, said in Python over the records."""
    version = max(s.trace.policy_version for s in t.steps if s.trace)
    checks = [
        f.run is None or t.run_id == f.run,
        f.kind is None or t.kind == f.kind,
        f.env is None or t.env_id == f.env,
        f.task is None or t.task.id == f.task,
        f.version is None or version == f.version,
        f.reward_min is None or t.reward >= f.reward_min,
        f.reward_max is None or t.reward <= f.reward_max,
        f.success is None or t.success == (f.success == "yes"),
        f.error is None or (t.error is not None) == (f.error == "yes"),
        f.risk_suite is None or t.tags.get("risk_suite") == f.risk_suite,
        f.verdict is None or (status[t.id] or "unjudged") == f.verdict,
    ]
    return all(checks)


FILTERS = [
    {},
    {"run": "run-a"},
    {"run": "run-b", "kind": "eval"},
    {"kind": "redteam", "risk_suite": "beta"},
    {"verdict": "unsafe"},
    {"verdict": "safe", "run": "run-a"},
    {"verdict": "unknown"},
    {"verdict": "unjudged", "env": "ops"},
    {"env": "arith", "success": "yes", "reward_min": "-0.2"},
    {"reward_max": "0", "error": "no", "version": "3"},
    {"error": "yes"},
    {"task": "ops/t3"},
    {"run": "run-a", "verdict": "unsafe", "env": "ops"},
]


@pytest.mark.parametrize("params", FILTERS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "all")
def test_pages_walk_every_match_once_newest_first(filled, params):
    store, trajs, status, _ = filled
    reader = StoreReader(store)
    f = TrajectoryFilter.parse(params)
    expected = [t.id for t in reversed(trajs) if _matches(t, f, status)]
    assert expected, f"the test store should hold matches for {params}"
    seen: list[str] = []
    pages = []
    page = reader.page(f, limit=7)
    assert page.newer is None  # the newest page has nothing newer
    while True:
        pages.append([r["id"] for r in page.rows])
        seen += pages[-1]
        assert all((r["status"] or "unjudged") == (status[r["id"]] or "unjudged") for r in page.rows)
        if page.older is None:
            break
        page = reader.page(f, before=page.older, limit=7)
    assert seen == expected
    # and back again: each newer page is the page that was before it
    for previous in reversed(pages[:-1]):
        page = reader.page(f, after=page.newer, limit=7)
        assert [r["id"] for r in page.rows] == previous
    assert page.newer is None


def test_a_bad_filter_value_is_refused_by_name():
    for params, word in (
        ({"version": "x"}, "version"),
        ({"verdict": "evil"}, "verdict"),
        ({"reward_min": "nan"}, "finite"),
    ):
        with pytest.raises(FilterError, match=word):
            TrajectoryFilter.parse(params)


def test_a_run_s_kinds_come_from_its_index(filled):
    store, trajs, _, _ = filled
    reader = StoreReader(store)
    assert reader.kinds("run-b") == sorted({t.kind for t in trajs if t.run_id == "run-b"})
    assert reader.kinds("no-such-run") == []


def test_one_trajectory_with_integrity_chain_and_lineage(filled):
    store, trajs, status, consumed = filled
    reader = StoreReader(store)
    first_of_a = next(t for t in trajs if t.run_id == "run-a")
    detail = reader.detail(first_of_a.id)
    assert detail.problem is None and detail.chain == "first of its run"
    later = [t for t in trajs if t.run_id == "run-a"][5]
    detail = reader.detail(later.id)
    assert detail.chain == "linked" and detail.status == status[later.id]
    assert detail.trajectory.steps[0].action.tool_calls[0].name == "read"
    # lineage: consumed at step 2, so in v2 only; at step 1, in v1 and v2
    assert reader.detail(consumed[15]).consumed == [{"consumer": "run-a", "train_step": 2, "versions": [2]}]
    assert reader.detail(consumed[0]).consumed == [{"consumer": "run-a", "train_step": 1, "versions": [1, 2]}]
    # the lineage filter lists exactly what the versions up to step 1 were trained on
    page = reader.page(TrajectoryFilter.parse({"consumer": "run-a", "step_max": "1"}), limit=50)
    assert {r["id"] for r in page.rows} == set(consumed[:10])
    assert reader.detail("no-such-id") is None


def test_a_row_changed_in_the_database_shows_as_unverified(filled):
    store, trajs, _, _ = filled
    victim = trajs[-1]
    with store.engine.begin() as conn:
        original = conn.execute(text("SELECT reward FROM trajectories WHERE id = :i"), {"i": victim.id}).scalar()
        conn.execute(text("UPDATE trajectories SET reward = :r WHERE id = :i"), {"r": original + 1, "i": victim.id})
    try:
        detail = StoreReader(store).detail(victim.id)
        assert detail.trajectory is None and detail.problem and "content hash" in detail.problem
    finally:
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE trajectories SET reward = :r WHERE id = :i"), {"r": original, "i": victim.id})
    assert StoreReader(store).detail(victim.id).problem is None
