"""Integrity: `verify`, the check that nothing a decision rests on was changed in the store
(weights hashes and code versions: `safactory.provenance`; what it proves and what it cannot:
docs/integrity.md).

In one consistent snapshot of the store, `verify` checks:

* each run's trajectories, every row in insertion order (also rows past the run's recorded
  head, which it reports as appended): each trajectory's rows against its content (its steps
  against `n_steps`, the derived columns, the content hash over the stored texts and blobs,
  `safactory.data.rows.row_problem`), its content re-serialised against its hash, its
  `prev_hash` against its predecessor, and at the end the run's recorded head (count, last
  hash) and the row chain over content hashes and ingest times (`runs.traj_link`);
* each chained table (runs, consumption, checkpoints, scores, safety_verdicts,
  gate_decisions; `safactory.data.seal`): every row's place and link, ids rising along the
  chain, a run's config against its hash, and the chain against its head in `chain_heads`;
* rows that belong to nothing (steps and token traces without their trajectory,
  trajectories without their run) and tasks whose body no longer matches their hash;
* with a key, the HMAC of every head; with an `Expected` head, the store's head against it
  (`safactory.data.anchor`).

It stops at the first problem of each run and each table, and names the row.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Integer, Table, func, select
from sqlalchemy.engine import Connection

from safactory.data.anchor import Expected, compare, store_head
from safactory.data.codec import content_hash
from safactory.data.schema import CHAINED, chain_heads, runs, steps, tasks, token_traces, trajectories
from safactory.data.seal import (
    RUN_SCOPE,
    integrity_record,
    mac_heads,
    mac_ok,
    row_link,
    run_mac,
    table_mac,
    trajectory_link,
)
from safactory.data.store import CorruptRecordError, TrajectoryStore
from safactory.types import sha256_hex


@dataclass
class VerifyReport:
    checked: int = 0  # trajectories
    runs: int = 0
    rows: int = 0  # rows of the chained tables
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what this check could not prove
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)  # scope -> (rows, last link), as walked
    links_at: dict[str, str] = field(default_factory=dict)  # scope -> link at the expected head's position
    head: str = ""  # the store's head (`safactory.data.anchor.store_head`)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    store: TrajectoryStore,
    progress: Callable[[int], None] | None = None,
    *,
    key: bytes | None = None,
    expected: Expected | None = None,
    check_macs: bool = True,
) -> VerifyReport:
    """Check every chain of the store, its heads (their HMACs with a key: `key`, else the store's
    own, from `SAFACTORY_STORE_KEY`; not with `check_macs=False`) and, when given, the `expected`
    head. A store that is being written to verifies too: the check reads one snapshot of it."""
    key = store.key if key is None else key
    mac_key = key if check_macs else None
    report = VerifyReport()
    at = expected.positions() if expected is not None else {}
    with store.snapshot() as conn:
        record = integrity_record(conn)
        recorded = conn.execute(select(runs).order_by(runs.c.created_at, runs.c.id)).mappings().all()
        for run in recorded:
            report.runs += 1
            problem = _verify_run(store, conn, run, mac_key, report, progress, at)
            if problem:
                report.problems.append(problem)
        _verify_leftovers(conn, {r["id"] for r in recorded}, report)
        heads = {row.scope: row for row in conn.execute(select(chain_heads))}
        for table in CHAINED:
            problem = _verify_table(conn, table, heads.get(table.name), mac_key, report, at)
            if problem:
                report.problems.append(problem)
    report.head = store_head(report.heads, key)
    report.notes += _notes(record, mac_key)
    if "damaged" in record:
        report.problems.append(f"safactory_meta: the store's integrity record was modified: {record['damaged']!r}")
    if expected is not None:
        report.problems += compare(expected, report.heads, report.links_at, key)
    return report


def authenticate_heads(store: TrajectoryStore, report: VerifyReport, key: bytes) -> list[str]:
    """After a clean check (`verify(..., check_macs=False)`), give every head it found its HMAC under
    `key`: the way for a store written without the key. It vouches for the store as it is now.
    Returns the scopes whose head moved since the check (not authenticated: check again)."""
    if not report.ok:
        raise ValueError("the store did not verify: its heads are not authenticated")
    with store.engine.begin() as conn:
        return mac_heads(conn, report.heads, key)


def _verify_run(
    store: TrajectoryStore,
    conn: Connection,
    run: Mapping[str, Any],
    key: bytes | None,
    report: VerifyReport,
    progress: Callable[[int], None] | None,
    at: Mapping[str, int],
) -> str | None:
    """The first problem in one run's trajectories, or None."""
    run_id, recorded = run["id"], run["n_trajectories"]
    scope = RUN_SCOPE + run_id
    want = at.get(scope)
    expected_prev = link = ""
    n = 0
    if want == 0:
        report.links_at[scope] = ""
    try:
        for loaded in store.scan(conn, run_id=run_id):
            traj = loaded.traj
            n += 1
            report.checked += 1
            if progress is not None:
                progress(1)
            where = f"run {run_id}: trajectory {traj.id} (#{n})"
            if n > recorded:
                return (
                    f"{where} lies past the run's recorded head of {recorded} trajectories: "
                    "it was appended outside the store's API"
                )
            if loaded.problem is not None:
                return f"{where} was modified: {loaded.problem}"
            if content_hash(traj) != traj.content_hash:
                return f"{where} was modified: its content no longer matches its hash"
            if traj.prev_hash != expected_prev:
                return (
                    f"{where} does not follow its stored predecessor: "
                    f"the trajectory with hash {traj.prev_hash[:12] or '(none)'} before it was deleted or moved"
                )
            expected_prev = traj.content_hash
            link = trajectory_link(link, traj.content_hash, loaded.created_at)
            if want == n:
                report.links_at[scope] = link
    except CorruptRecordError as exc:
        return f"run {run_id}: a stored trajectory was modified so that it can no longer be read: {exc}"
    report.heads[scope] = (n, link)
    if recorded != n or run["head_hash"] != expected_prev:
        return (
            f"run {run_id}: the chain holds {n} trajectories but the run recorded {recorded} "
            f"ending in hash {run['head_hash'][:12]}: trajectories at its end were deleted or replaced"
        )
    if (run["traj_link"] or "") != link:
        return (
            f"run {run_id}: its trajectories' row chain does not match the run's recorded head: "
            "the ingest time (created_at) of one of them, or the head itself, was changed"
        )
    if key is not None and not mac_ok(key, run["traj_mac"], run_mac(key, run_id, n, run["head_hash"], link)):
        return f"run {run_id}: the HMAC of its trajectory head {_mac_trouble(run['traj_mac'])}"
    return None


def _verify_table(
    conn: Connection,
    table: Table,
    head: Any,
    key: bytes | None,
    report: VerifyReport,
    at: Mapping[str, int],
) -> str | None:
    """The first problem in one chained table, or None."""
    name = table.name
    want = at.get(name)
    if want == 0:
        report.links_at[name] = ""
    serial = "id" in table.c and isinstance(table.c.id.type, Integer)
    link, n, last_id = "", 0, None
    stmt = select(table).order_by(table.c.chain_seq, *table.primary_key).execution_options(yield_per=2000)
    for row in conn.execute(stmt).mappings():
        report.rows += 1
        described, seq = _describe(table, row), row["chain_seq"]
        what = f"{name}: the row {described}"
        if seq is None:
            return f"{what} has no place in the table's chain: it was written outside the store's API"
        if seq < n:
            return f"{what} claims position {seq}, which another row holds: added or moved outside the store's API"
        if seq > n:
            return f"{name}: the row at position {n} is missing (deleted or moved); the next is {described} at {seq}"
        expected = row_link(link, table, row)
        if row["chain_hash"] != expected:
            return f"{what} (#{n}) was modified, or the row before it deleted or moved: it no longer matches its link"
        if serial:
            if last_id is not None and row["id"] <= last_id:
                return f"{what} (#{n}) is out of order: its id comes before the one of the row ahead of it"
            last_id = row["id"]
        if table is runs and sha256_hex(row["config"]) != row["config_hash"]:
            return f"{what}: its config no longer matches its config hash"
        link = expected
        n += 1
        if want == n:
            report.links_at[name] = link
    report.heads[name] = (n, link)
    if head is None:
        return f"{name}: the head of its chain is missing from chain_heads (deleted)"
    if n > head.n:
        return f"{name}: {n - head.n} rows lie past its recorded head of {head.n}: appended outside the store's API"
    if n != head.n or link != head.link:
        return (
            f"{name}: the chain holds {n} rows but its recorded head says {head.n} ending in {head.link[:12]}: "
            "rows at its end were deleted or replaced"
        )
    if key is not None and not mac_ok(key, head.mac, table_mac(key, name, n, link)):
        return f"{name}: the HMAC of its head {_mac_trouble(head.mac)}"
    return None


def _describe(table: Table, row: Mapping[str, Any]) -> str:
    return ", ".join(f"{k.name}={row[k.name]}" for k in table.primary_key)


def _mac_trouble(stored: str | None) -> str:
    if not stored:
        return "is missing: the head was written without SAFACTORY_STORE_KEY, or its HMAC was removed"
    return "does not match: its rows and head were rewritten, or written under another key"


def _verify_leftovers(conn: Connection, recorded: set[str], report: VerifyReport) -> None:
    """Rows that belong to nothing, and tasks whose stored body no longer matches their hash."""
    stmt = select(trajectories.c.run_id, func.count()).group_by(trajectories.c.run_id).order_by(trajectories.c.run_id)
    if recorded:
        stmt = stmt.where(trajectories.c.run_id.not_in(recorded))
    for run_id, n in conn.execute(stmt).all():
        report.problems.append(
            f"run {run_id}: {n} stored trajectories belong to no recorded run (its record was deleted)"
        )
    for table in (steps, token_traces):
        known = select(trajectories.c.id).where(trajectories.c.id == table.c.trajectory_id).exists()
        stray = conn.execute(select(table.c.trajectory_id, func.count()).where(~known).group_by(table.c.trajectory_id))
        found = stray.all()
        if found:
            report.problems.append(
                f"{table.name}: {sum(n for _, n in found)} rows belong to no stored trajectory "
                f"(e.g. of {found[0][0]}): their trajectory's row was deleted, or they were added"
            )
    for row in conn.execute(select(tasks).execution_options(yield_per=2000)).mappings():
        problem = _task_problem(row)
        if problem:
            report.problems.append(f"tasks: the task {row['hash'][:12]} ({row['task_id']}) {problem}")
            break


def _task_problem(row: Mapping[str, Any]) -> str | None:
    if hashlib.sha256(row["body"].encode()).hexdigest() != row["hash"]:
        return "was modified: its body no longer matches its hash"
    try:
        body = json.loads(row["body"])
        columns = (body["id"], body["env_id"], body["split"])
    except (ValueError, KeyError, TypeError):
        return "was modified: its body is not a task"
    if columns != (row["task_id"], row["env_id"], row["split"]):
        return "was modified: its id, env or split column is not its body's"
    return None


def _notes(record: Mapping[str, Any], key: bytes | None) -> list[str]:
    notes = []
    if key is None:
        notes.append(
            "heads checked without a key (SAFACTORY_STORE_KEY unset): whoever can write to the database can "
            "rewrite rows and recompute every hash; only an expected head kept outside it catches that"
        )
    sealed = record.get("sealed_as_found") or {}
    if sealed:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("since", 0))))
        parts = ", ".join(f"{n} {name}" for name, n in sorted(sealed.items()))
        notes.append(
            f"{parts} were stored before this store had its chains and were sealed as found on {since}: they are "
            "proven unchanged since then, not before (trajectory content hashes are checked as always)"
        )
    return notes
