"""The canonical content hash (schema version 4): what it covers, that the store writes the very
texts and blobs it hashed, that trajectories of every shape round-trip and verify, that
records and stores of schema version 3 keep working, and that concurrent adds keep one chain."""

from __future__ import annotations

import json
import math

import pytest
from sqlalchemy import text

from safactory.data.codec import content_hash, encode_trajectory
from safactory.data.integrity import verify
from safactory.data.store import TrajectoryStore
from safactory.jobs.export import export, import_trajectories
from safactory.types import (
    Message,
    Step,
    Task,
    TokenTrace,
    ToolCall,
    ToolSpec,
    Trajectory,
    canonical_json,
    sha256_hex,
)


def rich(run_id: str = "r", task_data: dict | None = None, tid: str | None = None) -> Trajectory:
    """Tool calls, unsorted dict keys, unicode and newlines, a step without a trace, a prompt
    that does not extend the previous turn, one that does, several policy versions."""
    task = Task(id="t1", env_id="env", split="train", prompt="p", data=task_data or {"b": 1, "a": [2, {"d": 3}]})
    params = {"type": "object", "properties": {"z": {"type": "string"}, "a": {"type": "integer"}}, "required": ["z"]}
    call = ToolCall(id="c1", name="f", arguments={"z": "x\ny \u00e9\u2713", "a": 1})
    steps = [
        Step(
            index=0,
            action=Message(role="assistant", content="call f", tool_calls=[call]),
            observation=[Message(role="tool", content='h\u00e9llo\n"q"', tool_call_id="c1", name="f")],
            info={"b": 1, "a": [1.5, {"d": None, "c": "x"}]},
            trace=TokenTrace(
                prompt_ids=list(range(1, 11)),
                completion_ids=[11, 12, 13],
                logprobs=[-0.1, -0.25, -3.0],
                policy_version=1,
                policy_versions=[1, 2],
            ),
        ),
        Step(index=1, action=Message(role="assistant", content="oops"), reward=0.5, error="boom"),
        Step(
            index=2,
            action=Message(role="assistant", content="again"),
            trace=TokenTrace(
                prompt_ids=[1, 2, 3, 99, 98],
                completion_ids=[7],
                temperature=0.7,
                top_p=0.9,
                finish_reason="length",
                policy_version=2,
            ),
        ),
        Step(
            index=3,
            action=Message(role="assistant", content="done"),
            reward=1.0,
            trace=TokenTrace(prompt_ids=[1, 2, 3, 99, 98, 7, 5], completion_ids=[8, 9], logprobs=[-1e-05, -2.5e-08]),
        ),
    ]
    kwargs = {} if tid is None else {"id": tid}
    return Trajectory(
        run_id=run_id,
        group_id="g",
        kind="rollout",
        task=task,
        env_id="env",
        env_version="1.2",
        seed=2**40 + 3,
        prompt=[Message(role="system", content="sys"), Message(role="user", content="u")],
        tools=[ToolSpec(name="f", description="d", parameters=params)],
        steps=steps,
        reward=0.75,
        success=True,
        termination="done",
        provenance={"z": 1, "a": {"y": 2, "x": 1}},
        started_at=1700000000.125,
        duration_s=1.5,
        tags={"k": "v"},
        **kwargs,
    )


@pytest.fixture
def store(store_url):
    s = TrajectoryStore(store_url)
    s.create_run("r", {})
    yield s
    s.close()


def test_every_shape_round_trips_keeps_key_order_and_verifies(store):
    trajs = [rich(), rich(task_data={"a": [2, {"d": 3}], "b": 1})]
    assert store.add(trajs) == 2
    for original, loaded in zip(trajs, store.get([t.id for t in trajs]), strict=True):
        assert loaded.model_dump() == original.model_dump()
        assert loaded.content_hash == original.content_hash == content_hash(loaded)
        assert loaded.task_hash == loaded.task.hash()
        assert list(loaded.steps[0].info) == ["b", "a"]
        assert list(loaded.tools[0].parameters["properties"]) == ["z", "a"]  # meaningful: param_names()
        assert list(loaded.steps[0].action.tool_calls[0].arguments) == ["z", "a"]
    # the two tasks differ only in key order: one row, one hash, and both trajectories verify
    assert trajs[0].task_hash == trajs[1].task_hash
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM tasks")).scalar_one() == 1
    assert verify(store).ok


def test_store_writes_the_very_texts_and_blobs_it_hashed(store):
    traj = rich()
    store.add([traj])
    enc = encode_trajectory(traj, traj.task.hash())
    assert enc.content_hash == traj.content_hash
    with store.engine.connect() as conn:
        steps = conn.execute(text("SELECT action, observation, info FROM steps ORDER BY idx")).all()
        traces = conn.execute(
            text("SELECT turn, prefix_len, prompt_suffix, completion_ids, logprobs FROM token_traces ORDER BY turn")
        ).all()
        meta = conn.execute(text("SELECT meta FROM trajectories")).scalar_one()
    assert [tuple(r) for r in steps] == [(a.decode(), o.decode(), i.decode()) for _, _, _, a, o, i, _ in enc.steps]
    packed = [(s[0], s[6][5:]) for s in enc.steps if s[6] is not None]
    assert [(r[0], (r[1], bytes(r[2]), bytes(r[3]), None if r[4] is None else bytes(r[4]))) for r in traces] == packed
    assert meta == enc.meta.decode()
    # turn 2 shares 3 ids with turn 0's prompt + completion, turn 3 extends turn 2
    assert [r[1] for r in traces] == [0, 3, 6]


MUTATIONS = {
    "reward": lambda t: setattr(t, "reward", 0.7500001),
    "seed": lambda t: setattr(t, "seed", t.seed + 1),
    "kind": lambda t: setattr(t, "kind", "eval"),
    "task data": lambda t: t.task.data.update(b=2),
    "task_hash field": lambda t: setattr(t, "task_hash", "0" * 64),
    "schema_version": lambda t: setattr(t, "schema_version", 5),
    "started_at": lambda t: setattr(t, "started_at", 1.0),
    "tags": lambda t: t.tags.update(k="w"),
    "provenance key order": lambda t: setattr(t, "provenance", dict(reversed(list(t.provenance.items())))),
    "tool parameter order": lambda t: t.tools[0].parameters.update(
        properties=dict(reversed(list(t.tools[0].parameters["properties"].items())))
    ),
    "prompt": lambda t: t.prompt.pop(),
    "action": lambda t: setattr(t.steps[1].action, "content", "oops!"),
    "tool call arguments": lambda t: t.steps[0].action.tool_calls[0].arguments.update(a=2),
    "observation": lambda t: setattr(t.steps[0].observation[0], "name", None),
    "info value": lambda t: t.steps[0].info.update(b=2),
    "info key order": lambda t: setattr(t.steps[0], "info", dict(reversed(list(t.steps[0].info.items())))),
    "step reward": lambda t: setattr(t.steps[0], "reward", 0.0),
    "step error": lambda t: setattr(t.steps[1], "error", None),
    "step index": lambda t: setattr(t.steps[1], "index", 7),
    "prompt id": lambda t: t.steps[2].trace.prompt_ids.__setitem__(0, 4),
    "prompt id in shared prefix": lambda t: t.steps[3].trace.prompt_ids.__setitem__(1, 4),
    "completion id": lambda t: t.steps[0].trace.completion_ids.append(5),
    "logprob": lambda t: t.steps[0].trace.logprobs.__setitem__(2, -2.0),
    "logprobs dropped": lambda t: setattr(t.steps[0].trace, "logprobs", None),
    "policy versions": lambda t: setattr(t.steps[0].trace, "policy_versions", [1]),
    "temperature": lambda t: setattr(t.steps[2].trace, "temperature", 0.8),
    "finish reason": lambda t: setattr(t.steps[2].trace, "finish_reason", "stop"),
    "trace dropped": lambda t: setattr(t.steps[3], "trace", None),
    "step dropped": lambda t: t.steps.pop(1),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_hash_covers_every_field(name):
    traj = rich(tid="0190d6f0-0000-7000-8000-000000000000")
    traj.task_hash = traj.task.hash()
    before = content_hash(traj)
    assert content_hash(rich(tid=traj.id).model_copy(update={"task_hash": traj.task_hash})) == before
    MUTATIONS[name](traj)
    assert content_hash(traj) != before


def test_the_canonical_form_is_pinned():
    """A change here changes every stored hash: it needs a new SCHEMA_VERSION, with the old
    form kept for the old records (as version 3's is)."""
    traj = rich(tid="0190d6f0-0000-7000-8000-000000000000")
    traj.task_hash = traj.task.hash()
    assert content_hash(traj) == "1cdf0837216f5504cedea7427d1d8ca9d5c7aba376ee347fdf28bac6c07f67bc"


def test_non_finite_info_values_are_stored_and_verify(store):
    traj = rich()
    traj.steps[1].info = {"nan": float("nan"), "inf": float("-inf")}
    store.add([traj])
    (loaded,) = store.get([traj.id])
    assert math.isnan(loaded.steps[1].info["nan"]) and loaded.steps[1].info["inf"] == float("-inf")
    assert content_hash(loaded) == traj.content_hash
    assert verify(store).ok


EDITS = {  # name: (SQL on the second trajectory :tid, index of the trajectory verify must name)
    "info key order": ("UPDATE steps SET info = :v WHERE trajectory_id = :tid AND idx = 0", 1),
    "observation": ("UPDATE steps SET observation = '[]' WHERE trajectory_id = :tid AND idx = 0", 1),
    "step reward": ("UPDATE steps SET reward = 0.25 WHERE trajectory_id = :tid AND idx = 1", 1),
    "meta": ('UPDATE trajectories SET meta = replace(meta, \'"k":"v"\', \'"k":"w"\') WHERE id = :tid', 1),
    "prefix_len": ("UPDATE token_traces SET prefix_len = 2 WHERE trajectory_id = :tid AND turn = 2", 1),
    "policy_versions": ("UPDATE token_traces SET policy_versions = '[1]' WHERE trajectory_id = :tid AND turn = 0", 1),
    "temperature": ("UPDATE token_traces SET temperature = 0.5 WHERE trajectory_id = :tid AND turn = 2", 1),
    "logprobs": ("UPDATE token_traces SET logprobs = NULL WHERE trajectory_id = :tid AND turn = 0", 1),
    # both trajectories share the task row: the first one in the chain is named
    "task body": ('UPDATE tasks SET body = replace(body, \'"prompt":"p"\', \'"prompt":"q"\')', 0),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_verify_catches_an_edit_of_any_stored_part(tmp_path, name):
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'store.db'}")
    store.create_run("r", {})
    trajs = [rich(), rich()]
    store.add(trajs)
    sql, named = EDITS[name]
    with store.engine.begin() as conn:
        params = {"tid": trajs[1].id, "v": '{"a":[1.5,{"d":null,"c":"x"}],"b":1}'}
        assert conn.execute(text(sql), params).rowcount >= 1
    report = verify(store)
    assert not report.ok and trajs[named].id in report.problems[0] and "modified" in report.problems[0]
    store.close()


def test_version_3_records_keep_their_hash_through_export_and_import(store, tmp_path):
    old = rich()
    old.schema_version = 3
    old.task_hash = old.task.hash()
    legacy = sha256_hex(canonical_json(old.model_dump(exclude={"content_hash", "prev_hash"})))
    old.content_hash = legacy
    assert content_hash(old) == legacy
    path = tmp_path / "v3.jsonl"
    path.write_text(json.dumps(old.model_dump(mode="json")) + "\n")
    assert import_trajectories(store, path) == 1
    (loaded,) = store.get([old.id])
    assert loaded.schema_version == 3 and loaded.content_hash == legacy
    assert verify(store).ok
    export([loaded], "jsonl", tmp_path / "again.jsonl")
    assert json.loads((tmp_path / "again.jsonl").read_text())["content_hash"] == legacy


def test_a_version_3_store_opens_verifies_and_takes_new_trajectories(store_url):
    """Version 3 had the same tables; its trajectories record schema_version 3 and keep that hash."""
    store = TrajectoryStore(store_url)
    store.create_run("r", {})
    old = rich()
    old.schema_version = 3
    store.add([old])
    assert old.content_hash == sha256_hex(canonical_json(old.model_dump(exclude={"content_hash", "prev_hash"})))
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE safactory_meta SET value = '3' WHERE key = 'schema_version'"))
    store.close()

    store = TrajectoryStore(store_url)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM safactory_meta WHERE key = 'schema_version'")).scalar_one() == "4"
    new = rich()
    store.add([new])
    assert new.prev_hash == old.content_hash and new.schema_version == 4
    assert [t.schema_version for t in store.query(run_id="r")] == [3, 4]
    assert verify(store).ok
    store.close()


def test_concurrent_adds_to_one_run_keep_one_chain_and_skip_duplicates(store_url):
    import random
    from concurrent.futures import ThreadPoolExecutor

    from tests.synthetic import synthetic_trajectory

    store = TrajectoryStore(store_url)
    store.create_run("c", {})
    rng = random.Random(0)
    batches = [[synthetic_trajectory("c", rng) for _ in range(5)] for _ in range(12)]
    copies = [[t.model_copy(deep=True) for t in b] for b in batches]  # the same ids, added concurrently
    with ThreadPoolExecutor(8) as pool:
        added = list(pool.map(store.add, batches + copies))
    assert sum(added) == 60 and store.count(run_id="c") == 60
    report = verify(store)
    assert report.ok, report.problems
    assert store.run_info("c")["n_trajectories"] == 60
    store.close()
