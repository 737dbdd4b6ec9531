"""Tamper evidence, on SQLite and PostgreSQL: every single-row field edit, deletion, reordering
and appended row on every table `verify` protects is detected; the outside probe's forged row
is caught by `verify` and refused by readers; an expected head kept outside the store and an
HMAC key catch rows rewritten with every sha256 recomputed (and what a key holder can do is
not caught); an old store is sealed on open and verifies; ledger writes keep one chain."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Boolean, Float, Integer, LargeBinary, String, delete, insert, select, text, update
from sqlalchemy.engine import Connection
from typer.testing import CliRunner

from safactory.cli import app
from safactory.data.codec import content_hash
from safactory.data.integrity import verify
from safactory.data.rows import TaskHashes, _rows, _task_rows
from safactory.data.schema import (
    CHAINED,
    STEP_COLUMNS,
    TASK_COLUMNS,
    TRACE_COLUMNS,
    TRAJECTORY_COLUMNS,
    chain_heads,
    checkpoints,
    consumption,
    gate_decisions,
    metadata,
    runs,
    safety_verdicts,
    scores,
    steps,
    tasks,
    token_traces,
    trajectories,
)
from safactory.data.seal import row_link, table_mac, trajectory_link
from safactory.data.store import CorruptRecordError, TrajectoryStore
from tests.synthetic import synthetic_trajectory

KEY = b"a key the database never sees"
PROTECTED = (trajectories, steps, token_traces, tasks, *CHAINED, chain_heads)


@pytest.fixture(autouse=True)
def _no_key_in_the_environment(monkeypatch):
    monkeypatch.delenv("SAFACTORY_STORE_KEY", raising=False)


def stock(url: str, key: bytes | None = None) -> TrajectoryStore:
    """Two runs of trajectories, consumption, checkpoints with lineage, scores, verdicts, gate decisions."""
    store = TrajectoryStore(url, key=key)
    store.create_run("r", {"lr": 0.1})
    store.create_run("r2", {"lr": 0.2})
    rng = random.Random(0)
    trajs = [synthetic_trajectory("r", rng, turns=2, tokens_per_turn=4) for _ in range(4)]
    store.add(trajs[:2])
    store.add(trajs[2:])
    store.add([synthetic_trajectory("r2", rng, turns=2, tokens_per_turn=4) for _ in range(2)])
    ids = [t.id for t in trajs]
    store.mark_consumed(ids[:2], step=1, consumer="r")
    store.mark_consumed(ids[2:3], step=2, consumer="r")
    for v in range(3):
        parent = v - 1 if v else None
        store.add_checkpoint("r", v, weights_hash=f"w{v}", train_step=v, parent_version=parent, path=f"/c/{v}")
    for k, i in enumerate(ids[:3]):
        store.add_score(i, judge="rules", name="quality", value=0.25 * k)
    store.add_verdicts(
        [
            {"trajectory_id": i, "judge": "rules", "judge_version": "1", "unsafe": k == 1, "severity": 0.5 * k}
            for k, i in enumerate(ids[:3])
        ]
    )
    for v in (1, 2, 3):
        store.add_gate_decision("r", {"candidate_version": v, "baseline_version": v - 1, "accepted": v != 2})
    return store


@dataclass
class Ctx:
    """What the changes aim at: the ids of run r's trajectories (mid: the second), the dialect."""

    ids: list[str]
    mid: str
    mid_task: str
    dialect: str


def context(store: TrajectoryStore) -> Ctx:
    ids = [t.id for t in store.query(run_id="r")]
    with store.engine.connect() as conn:
        task = conn.execute(select(trajectories.c.task_hash).where(trajectories.c.id == ids[1])).scalar_one()
        return Ctx(ids, ids[1], task, conn.dialect.name)


def save(store: TrajectoryStore) -> dict[str, list[dict[str, Any]]]:
    with store.engine.connect() as conn:
        return {t.name: [dict(r) for r in conn.execute(select(t)).mappings()] for t in metadata.sorted_tables}


def restore(store: TrajectoryStore, saved: dict[str, list[dict[str, Any]]]) -> None:
    with store.engine.begin() as conn:
        for t in reversed(metadata.sorted_tables):
            conn.execute(delete(t))
        for t in metadata.sorted_tables:
            if saved[t.name]:
                conn.execute(insert(t), saved[t.name])


def dump(store: TrajectoryStore) -> dict[str, list[str]]:
    return {name: sorted(map(repr, rows)) for name, rows in save(store).items()}


# ---- the changes -----------------------------------------------------------------------------
Change = Callable[[Connection, Ctx], None]


def target(table: Any, ctx: Ctx) -> list[Any]:
    """The row a single-row change aims at: a middle one wherever the table has an order."""
    if table is trajectories:
        return [trajectories.c.id == ctx.mid]
    if table in (steps, token_traces):
        return [table.c.trajectory_id == ctx.mid, (table.c.idx if table is steps else table.c.turn) == 1]
    if table is tasks:
        return [tasks.c.hash == ctx.mid_task]
    if table is runs:
        return [runs.c.id == "r"]
    if table is chain_heads:
        return [chain_heads.c.scope == "consumption"]
    return [table.c.chain_seq == 1]


def changed(column: Any, value: Any) -> Any:
    """Another value of the column's type (JSON text stays JSON)."""
    kind = column.type
    if isinstance(kind, Boolean):
        return not value
    if isinstance(kind, Integer):
        return (value or 0) + 100
    if isinstance(kind, Float):
        return (value or 0.0) + 0.5
    if isinstance(kind, LargeBinary):
        return (value or b"") + b"\x07\x00\x00\x00"
    if value is None:
        return "x"
    if isinstance(kind, String) and kind.length:  # a hash: another one of the same length
        return value[:-1] + ("1" if value.endswith("0") else "0")
    if value[:1] in ("{", "["):
        data = json.loads(value)
        return json.dumps({**data, "zz": 1} if isinstance(data, dict) else [*data, 0], separators=(",", ":"))
    return value + "x"


# a single-row edit of these changes nothing anyone reads (covered by the reorderings), or is a MAC
UNREAD = {
    "trajectories.seq": "an order key: moved without reordering, nothing read changes",
    "scores.id": "an order key (the chain checks the ids rise)",
    "safety_verdicts.id": "an order key (the chain checks the ids rise)",
    "gate_decisions.id": "an order key (the chain checks the ids rise)",
    "runs.traj_mac": "an HMAC: checked with a key (test_a_key_catches_...)",
    "chain_heads.mac": "an HMAC: checked with a key (test_a_key_catches_...)",
}


def edit(table: Any, column: str) -> Change:
    def change(conn: Connection, ctx: Ctx) -> None:
        where = target(table, ctx)
        value = conn.execute(select(table.c[column]).where(*where)).scalar_one()
        assert conn.execute(update(table).where(*where).values({column: changed(table.c[column], value)})).rowcount == 1

    return change


def remove(table: Any, where: Callable[[Ctx], list[Any]], clean: bool = False) -> Change:
    """Delete rows; `clean` (trajectories): with their steps and traces, so that only the chain can tell."""

    def change(conn: Connection, ctx: Ctx) -> None:
        conds = where(ctx)
        if clean:
            gone = list(conn.execute(select(trajectories.c.id).where(*conds)).scalars())
            for t in (steps, token_traces):
                conn.execute(delete(t).where(t.c.trajectory_id.in_(gone)))
        assert conn.execute(delete(table).where(*conds)).rowcount >= 1

    return change


def swap(table: Any, column: str, a: Callable[[Ctx], list[Any]], b: Callable[[Ctx], list[Any]], temp: Any) -> Change:
    """Swap `column` between two rows (through `temp`, for keys)."""

    def change(conn: Connection, ctx: Ctx) -> None:
        va = conn.execute(select(table.c[column]).where(*a(ctx))).scalar_one()
        vb = conn.execute(select(table.c[column]).where(*b(ctx))).scalar_one()
        assert va != vb
        conn.execute(update(table).where(*a(ctx)).values({column: temp}))
        conn.execute(update(table).where(*b(ctx)).values({column: va}))
        conn.execute(update(table).where(table.c[column] == temp).values({column: vb}))

    return change


def at(table: Any, seq: int) -> Callable[[Ctx], list[Any]]:
    return lambda ctx: [table.c.chain_seq == seq]


def append_chained(table: Any, new_key: dict[str, Any]) -> Change:
    """A copy of the table's last row under a new key, at the next place, with the right link: all
    but the table's head (the realistic append of someone who knows the format)."""

    def change(conn: Connection, ctx: Ctx) -> None:
        last = conn.execute(select(table).order_by(table.c.chain_seq.desc()).limit(1)).mappings().one()
        row = {k: v for k, v in last.items() if k != "id"} | new_key
        row["chain_seq"] = last["chain_seq"] + 1
        row["chain_hash"] = row_link(last["chain_hash"], table, row)
        conn.execute(insert(table).values(row))

    return change


def append_probe_row(conn: Connection, ctx: Ctx) -> None:
    """The outside probe's forged row, verbatim (PostgreSQL takes `true` for a boolean)."""
    one = "true" if ctx.dialect == "postgresql" else "1"
    conn.execute(
        text(
            "insert into trajectories select (select max(seq)+1 from trajectories),'forged-1', run_id, kind, "
            "group_id, task_hash, task_id, split, env_id, env_version, seed, policy_version, n_steps, 1.0, "
            f"{one}, termination, error, created_at, content_hash, prev_hash, meta from trajectories "
            "where kind='rollout' limit 1;"
        )
    )


def append_whole_trajectory(conn: Connection, ctx: Ctx) -> None:
    """A complete, consistent trajectory (rows, steps, traces, its own content hash, chained onto the
    run's head) appended without moving the run's head."""
    head = conn.execute(select(runs.c.head_hash).where(runs.c.id == "r")).scalar_one()
    traj = synthetic_trajectory("r", random.Random(7), turns=2, tokens_per_turn=4)
    task_rows = _task_rows([traj], TaskHashes())
    for h, row in task_rows.items():
        if conn.execute(select(tasks.c.hash).where(tasks.c.hash == h)).first() is None:
            conn.execute(insert(tasks).values(dict(zip(TASK_COLUMNS, row, strict=True))))
    traj_rows: list[tuple[Any, ...]] = []
    step_rows: list[tuple[Any, ...]] = []
    trace_rows: list[tuple[Any, ...]] = []
    _rows(traj, head, 1.0, traj_rows, step_rows, trace_rows)
    conn.execute(insert(trajectories), [dict(zip(TRAJECTORY_COLUMNS, r, strict=True)) for r in traj_rows])
    conn.execute(insert(steps), [dict(zip(STEP_COLUMNS, r, strict=True)) for r in step_rows])
    conn.execute(insert(token_traces), [dict(zip(TRACE_COLUMNS, r, strict=True)) for r in trace_rows])


def mid(table: Any, idx: int) -> Callable[[Ctx], list[Any]]:
    col = table.c.idx if table is steps else table.c.turn
    return lambda ctx: [table.c.trajectory_id == ctx.mid, col == idx]


def by_id(n: int) -> Callable[[Ctx], list[Any]]:
    return lambda ctx: [trajectories.c.id == ctx.ids[n]]


def append_step_row(table: Any) -> Change:
    def change(conn: Connection, ctx: Ctx) -> None:
        row = dict(conn.execute(select(table).where(*mid(table, 1)(ctx))).mappings().one())
        row["idx" if table is steps else "turn"] = 2
        conn.execute(insert(table).values(row))

    return change


def delete_run_r2(conn: Connection, ctx: Ctx) -> None:
    remove(trajectories, lambda c: [trajectories.c.run_id == "r2"], clean=True)(conn, ctx)
    remove(runs, lambda c: [runs.c.id == "r2"])(conn, ctx)


def single_edits() -> dict[tuple[str, str], Change]:
    out = {}
    for table in PROTECTED:
        for column in table.c:
            name = f"{table.name}.{column.name}"
            if name not in UNREAD:
                out[(table.name, f"edit {column.name}")] = edit(table, column.name)
    return out


DELETIONS: dict[tuple[str, str], Change] = {
    ("trajectories", "delete a middle one"): remove(trajectories, by_id(1), clean=True),
    ("trajectories", "delete the last one"): remove(trajectories, by_id(3), clean=True),
    ("trajectories", "delete a run's all"): remove(trajectories, lambda ctx: [trajectories.c.run_id == "r2"], True),
    ("steps", "delete one"): remove(steps, mid(steps, 1)),
    ("token_traces", "delete one"): remove(token_traces, mid(token_traces, 0)),
    ("tasks", "delete one"): remove(tasks, lambda ctx: [tasks.c.hash == ctx.mid_task]),
    ("runs", "delete one"): remove(runs, lambda ctx: [runs.c.id == "r"]),
    ("runs", "delete the last with its trajectories"): delete_run_r2,
    ("chain_heads", "delete one"): remove(chain_heads, lambda ctx: [chain_heads.c.scope == "gate_decisions"]),
    **{(t.name, "delete a middle one"): remove(t, at(t, 1)) for t in CHAINED if t is not runs},
    **{(t.name, "delete the last one"): remove(t, at(t, 2)) for t in CHAINED if t is not runs},
}

REORDERINGS: dict[tuple[str, str], Change] = {
    ("trajectories", "swap two"): swap(trajectories, "seq", by_id(1), by_id(2), -1),
    ("steps", "swap two"): swap(steps, "idx", mid(steps, 0), mid(steps, 1), -1),
    ("token_traces", "swap two"): swap(token_traces, "turn", mid(token_traces, 0), mid(token_traces, 1), -1),
    ("runs", "swap chain places"): swap(runs, "chain_seq", at(runs, 0), at(runs, 1), -1),
    ("runs", "swap creation times"): swap(
        runs, "created_at", lambda ctx: [runs.c.id == "r"], lambda ctx: [runs.c.id == "r2"], -1.0
    ),
    **{(t.name, "swap chain places"): swap(t, "chain_seq", at(t, 0), at(t, 1), -1) for t in CHAINED if t is not runs},
    **{(t.name, "swap ids"): swap(t, "id", at(t, 0), at(t, 1), -1) for t in (scores, safety_verdicts, gate_decisions)},
}

APPENDS: dict[tuple[str, str], Change] = {
    ("trajectories", "append the probe's forged row"): append_probe_row,
    ("trajectories", "append a whole consistent one"): append_whole_trajectory,
    ("steps", "append one"): append_step_row(steps),
    ("token_traces", "append one"): append_step_row(token_traces),
    ("runs", "append one"): append_chained(runs, {"id": "forged-run"}),
    ("consumption", "append one"): append_chained(consumption, {"trajectory_id": "forged-t"}),
    ("checkpoints", "append one"): append_chained(checkpoints, {"version": 9, "weights_hash": "forged"}),
    ("scores", "append one"): append_chained(scores, {"value": 1.0}),
    ("safety_verdicts", "append one"): append_chained(safety_verdicts, {"unsafe": False}),
    ("gate_decisions", "append one"): append_chained(gate_decisions, {"candidate_version": 9, "accepted": True}),
}
# tasks are content-addressed (a new task that no trajectory points to changes nothing read) and a head
# row for a scope that does not exist is read by nothing: appending to either is not a change


def test_every_edit_deletion_reordering_and_append_is_detected(store_url):
    store = stock(store_url)
    ctx = context(store)
    assert verify(store).ok
    saved, clean = save(store), dump(store)
    cases = {**single_edits(), **DELETIONS, **REORDERINGS, **APPENDS}
    kinds = {(table, label.split()[0]) for table, label in cases}
    for table in PROTECTED:  # each table verify protects, each kind of change
        expected = {"edit", "delete", "swap", "append"} - ({"swap"} if table in (tasks, chain_heads) else set())
        expected -= {"append"} if table in (tasks, chain_heads) else set()
        assert {k for t, k in kinds if t == table.name} >= expected, table.name
    missed = []
    for (table, label), change in cases.items():
        with store.engine.begin() as conn:
            change(conn, ctx)
        report = verify(store)
        if report.ok:
            missed.append(f"{table}: {label}")
        restore(store, saved)
        assert dump(store) == clean, f"{table}: {label} was not undone"
    assert not missed, f"{len(missed)} of {len(cases)} changes went undetected: {missed}"
    assert len(cases) >= 140
    assert verify(store).ok
    store.close()


def test_the_probe_forged_row_is_caught_and_refused_by_readers(store_url):
    store = stock(store_url)
    ctx = context(store)
    with store.engine.begin() as conn:
        append_probe_row(conn, ctx)
    problems = verify(store).problems
    assert "forged-1" in problems[0] and "past the run's recorded head" in problems[0], problems
    with pytest.raises(CorruptRecordError, match="forged-1.*2 steps but 0 are stored"):
        list(store.iter(kind="rollout"))
    with pytest.raises(CorruptRecordError, match="forged-1"):
        store.get(["forged-1"])
    result = CliRunner().invoke(app, ["data", "verify", "--db", store_url])
    assert result.exit_code == 1 and "forged-1" in flat(result.output)
    store.close()


READER_EDITS = {  # SQL on the middle trajectory: what a reader must refuse
    "reward": ("UPDATE trajectories SET reward = 1.0 WHERE id = :i", "content hash"),
    "success": ("UPDATE trajectories SET success = NOT success WHERE id = :i", "content hash"),
    "n_steps": ("UPDATE trajectories SET n_steps = 1 WHERE id = :i", "1 steps but 2 are stored"),
    "split": ("UPDATE trajectories SET split = 'test' WHERE id = :i", "split"),
    "a step": ("DELETE FROM steps WHERE trajectory_id = :i AND idx = 1", "1 are stored"),
    "a step's reward": ("UPDATE steps SET reward = 1.0 WHERE trajectory_id = :i", "content hash"),
    "policy_version": ("UPDATE trajectories SET policy_version = 7 WHERE id = :i", "policy version"),
}


@pytest.mark.parametrize("name", list(READER_EDITS))
def test_readers_refuse_a_trajectory_whose_rows_do_not_match_its_content(tmp_path, name):
    store = stock(f"sqlite:///{tmp_path / 'store.db'}")
    ctx = context(store)
    sql, words = READER_EDITS[name]
    with store.engine.begin() as conn:
        conn.execute(text(sql), {"i": ctx.mid})
    with pytest.raises(CorruptRecordError, match=ctx.mid) as caught:
        list(store.iter())
    assert words in str(caught.value) and "modified in the database" in str(caught.value)
    with pytest.raises(CorruptRecordError, match=ctx.mid):
        store.get([ctx.mid])
    assert [t.id for t in store.iter(run_id="r2")]  # the others still read
    store.close()


# ---- rewrites that recompute every sha256: an expected head and a key ---------------------------
def rechain(conn: Connection, table: Any) -> None:
    """Relink a table and its head with plain sha256 (what anyone can compute), leaving the MAC as it is."""
    link, n = "", 0
    keys = list(table.primary_key)
    for row in conn.execute(select(table).order_by(table.c.chain_seq)).mappings().all():
        link = row_link(link, table, row)
        conn.execute(update(table).where(*(k == row[k.name] for k in keys)).values(chain_seq=n, chain_hash=link))
        n += 1
    conn.execute(update(chain_heads).where(chain_heads.c.scope == table.name).values(n=n, link=link))


def forge_last_trajectory(store: TrajectoryStore, run_id: str) -> str:
    """Make the run's last trajectory a success with reward 1, recomputing its hash, the run's head
    and its row chain (leaving the HMAC as it is). Returns its id."""
    last = store.query(run_id=run_id)[-1]
    last.reward, last.success = 1.0, True
    digest = content_hash(last)
    with store.engine.begin() as conn:
        conn.execute(
            update(trajectories)
            .where(trajectories.c.id == last.id)
            .values(reward=1.0, success=True, content_hash=digest)
        )
        link = ""
        rows = select(trajectories.c.content_hash, trajectories.c.created_at).where(trajectories.c.run_id == run_id)
        for content, created_at in conn.execute(rows.order_by(trajectories.c.seq)):
            link = trajectory_link(link, content, created_at)
        conn.execute(update(runs).where(runs.c.id == run_id).values(head_hash=digest, traj_link=link))
    return last.id


def flat(output: str) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(output.split())


def head_of(output: str) -> str:
    return next(line.split()[1] for line in output.splitlines() if line.startswith("head "))


def test_an_expected_head_catches_appends_and_rewrites_that_recompute_every_hash(store_url, tmp_path):
    store = stock(store_url)
    head_file = tmp_path / "head.json"
    cli = CliRunner()
    wrote = cli.invoke(app, ["data", "verify", "--db", store_url, "--write-head", str(head_file)])
    assert wrote.exit_code == 0, wrote.output
    head = head_of(wrote.output)
    assert cli.invoke(app, ["data", "verify", "--db", store_url, "--expect-head", head]).exit_code == 0
    assert cli.invoke(app, ["data", "verify", "--db", store_url, "--head-file", str(head_file)]).exit_code == 0

    store.add([synthetic_trajectory("r", random.Random(3))])  # an append after the head
    appended = cli.invoke(app, ["data", "verify", "--db", store_url, "--head-file", str(head_file)])
    assert appended.exit_code == 1
    assert "trajectories:r: 1 rows appended after the expected head" in flat(appended.output)
    assert cli.invoke(app, ["data", "verify", "--db", store_url, "--expect-head", head]).exit_code == 1

    wrote = cli.invoke(app, ["data", "verify", "--db", store_url, "--write-head", str(head_file)])
    forged = forge_last_trajectory(store, "r")
    with store.engine.begin() as conn:
        conn.execute(update(consumption).where(consumption.c.chain_seq == 0).values(train_step=5))
        rechain(conn, consumption)
    assert store.get([forged])[0].reward == 1.0  # consistent in every sha256 inside the store
    store.add([synthetic_trajectory("r", random.Random(4))])  # and a real append after the forged one
    assert verify(store).ok  # without a key or an expected head this cannot be caught
    caught = cli.invoke(app, ["data", "verify", "--db", store_url, "--head-file", str(head_file)])
    assert caught.exit_code == 1
    assert "trajectories:r: changed since the expected head (5 rows then, 6 now)" in flat(caught.output)
    assert "consumption: changed since the expected head" in flat(caught.output)
    assert cli.invoke(app, ["data", "verify", "--db", store_url, "--expect-head", head_of(wrote.output)]).exit_code == 1

    data = json.loads(head_file.read_text())  # a head file edited to match the store no longer holds together
    data["scopes"]["consumption"] = list(verify(store).heads["consumption"])
    head_file.write_text(json.dumps(data))
    edited = cli.invoke(app, ["data", "verify", "--db", store_url, "--head-file", str(head_file)])
    assert edited.exit_code == 1 and "does not hold together" in flat(edited.output)
    store.close()


def test_a_key_catches_rows_rewritten_with_recomputed_sha256(store_url, monkeypatch):
    store = stock(store_url, key=KEY)
    assert verify(store).ok
    with store.engine.begin() as conn:
        conn.execute(update(gate_decisions).where(gate_decisions.c.chain_seq == 1).values(accepted=True))
        rechain(conn, gate_decisions)
    plain = TrajectoryStore(store_url)  # no key: a rewrite with recomputed sha256 is consistent
    assert plain.key is None and verify(plain).ok
    problems = verify(store).problems
    assert len(problems) == 1 and "gate_decisions: the HMAC of its head does not match" in problems[0]
    assert not verify(plain, key=b"another key").ok

    forged = forge_last_trajectory(store, "r")
    assert verify(plain).ok
    problems = verify(store).problems
    assert any("run r: the HMAC of its trajectory head does not match" in p for p in problems), problems

    with store.engine.begin() as conn:  # stripping the HMACs does not help
        conn.execute(update(chain_heads).values(mac=""))
        conn.execute(update(runs).values(traj_mac=""))
    assert any("is missing" in p for p in verify(store).problems)

    monkeypatch.setenv("SAFACTORY_STORE_KEY", KEY.decode())
    result = CliRunner().invoke(app, ["data", "verify", "--db", store_url])
    assert result.exit_code == 1 and "HMAC" in result.output

    # what a key cannot catch: whoever holds the key and the store recomputes the HMACs too
    with store.engine.begin() as conn:
        for scope, n, link in conn.execute(select(chain_heads.c.scope, chain_heads.c.n, chain_heads.c.link)).all():
            conn.execute(
                update(chain_heads).where(chain_heads.c.scope == scope).values(mac=table_mac(KEY, scope, n, link))
            )
    store.add([synthetic_trajectory("r", random.Random(5))])  # a keyed write re-MACs the run's head
    store.add([synthetic_trajectory("r2", random.Random(6))])
    assert verify(store).ok and store.get([forged])[0].reward == 1.0
    plain.close()
    store.close()


# ---- old stores, relinking, concurrency -----------------------------------------------------------
def test_an_old_store_is_sealed_on_open_and_then_verifies_and_catches_edits(store_url):
    store = stock(store_url)
    with store.engine.begin() as conn:  # what a store made before the chains looks like
        for table in CHAINED:
            for column in ("chain_seq", "chain_hash") + (("traj_link", "traj_mac") if table is runs else ()):
                conn.execute(text(f"ALTER TABLE {table.name} DROP COLUMN {column}"))
        conn.execute(text("DROP TABLE chain_heads"))
        conn.execute(text("DELETE FROM safactory_meta WHERE key = 'integrity'"))
    store.close()

    store = TrajectoryStore(store_url)
    report = verify(store)
    assert report.ok, report.problems
    assert any("sealed as found" in note and "3 consumption" in note for note in report.notes), report.notes
    store.mark_consumed([context(store).ids[3]], step=3, consumer="r")
    store.add_gate_decision("r", {"candidate_version": 4, "baseline_version": 3, "accepted": True})
    assert verify(store).ok
    with store.engine.begin() as conn:
        conn.execute(update(checkpoints).where(checkpoints.c.version == 1).values(weights_hash="other"))
    assert any(p.startswith("checkpoints: the row run_id=r, version=1") for p in verify(store).problems)
    store.close()


def test_releasing_consumption_relinks_the_rows_after_it(store_url):
    store = stock(store_url)
    other = [t.id for t in store.query(run_id="r2")]
    store.mark_consumed(other, step=1, consumer="another")  # chained after consumer r's step-2 row
    assert store.release_consumed_after("r", 1) == 1
    report = verify(store)
    assert report.ok, report.problems
    assert report.heads["consumption"][0] == 4 and store.consumed_count("another") == 2
    assert store.release_consumed_after("r", 5) == 0
    store.close()


def test_concurrent_ledger_writes_keep_one_chain_per_table(store_url):
    store = stock(store_url)
    ids = context(store).ids

    def work(k: int) -> None:
        store.create_run("racing", {})
        store.mark_consumed([ids[k % 4]], step=k, consumer=f"c{k}")
        store.add_verdict(ids[0], judge="j", judge_version=str(k), unsafe=False)
        store.add_gate_decision("r", {"candidate_version": k, "baseline_version": 0, "accepted": True})
        store.add_checkpoint("r", 10 + k, weights_hash="w", train_step=k)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(work, range(12)))
    report = verify(store)
    assert report.ok, report.problems
    assert report.heads["runs"][0] == 3 and report.heads["gate_decisions"][0] == 15
    store.close()


def test_verify_reads_one_snapshot_while_the_store_is_written(store_url):
    """Rows committed while verify runs (to a run it has not walked yet, to the ledger) belong to a
    later head: they are neither checked nor reported as appended outside the API."""
    store = stock(store_url)
    ids = context(store).ids
    wrote: list[int] = []

    def write_meanwhile(_: int) -> None:
        if not wrote:
            wrote.append(store.add([synthetic_trajectory("r2", random.Random(9))]))
            store.mark_consumed([ids[3]], step=3, consumer="r")
            store.add_gate_decision("r", {"candidate_version": 4, "baseline_version": 3, "accepted": True})

    report = verify(store, progress=write_meanwhile)
    assert wrote == [1] and report.ok, report.problems
    assert report.heads["trajectories:r2"][0] == 2 and report.heads["gate_decisions"][0] == 3
    after = verify(store)
    assert after.ok and after.heads["trajectories:r2"][0] == 3 and after.heads["consumption"][0] == 4
    store.close()


def test_a_config_rewritten_with_its_chain_but_not_its_hash_is_caught(store_url):
    store = stock(store_url)
    with store.engine.begin() as conn:
        conn.execute(update(runs).where(runs.c.id == "r").values(config='{"lr":10.0}'))
        rechain(conn, runs)
    assert any("runs: the row id=r: its config no longer matches its config hash" in p for p in verify(store).problems)
    store.close()


def test_a_store_written_without_the_key_gets_its_heads_maced_after_a_clean_check(store_url, monkeypatch):
    store = stock(store_url)  # written without a key
    keyed = TrajectoryStore(store_url, key=KEY)
    assert any("is missing: the head was written without" in p for p in verify(keyed).problems)
    cli = CliRunner()
    assert cli.invoke(app, ["data", "verify", "--db", store_url, "--mac-heads"]).exit_code == 2  # needs the key
    monkeypatch.setenv("SAFACTORY_STORE_KEY", KEY.decode())
    with store.engine.begin() as conn:  # a broken store is not vouched for
        conn.execute(update(scores).where(scores.c.chain_seq == 0).values(value=9.0))
    assert cli.invoke(app, ["data", "verify", "--db", store_url, "--mac-heads"]).exit_code == 1
    with store.engine.begin() as conn:
        conn.execute(update(scores).where(scores.c.chain_seq == 0).values(value=0.0))
    result = cli.invoke(app, ["data", "verify", "--db", store_url, "--mac-heads"])
    assert result.exit_code == 0 and "MACed the heads" in result.output, result.output
    report = verify(keyed)
    assert report.ok and not report.notes, report.problems
    with store.engine.begin() as conn:
        conn.execute(update(scores).where(scores.c.chain_seq == 0).values(value=9.0))
        rechain(conn, scores)
    assert verify(store).ok and not verify(keyed).ok
    keyed.close()
    store.close()
