"""Tamper evidence beside the trajectories' content chains: the hash chain of each bookkeeping
table, the row chain of each run's trajectories, their heads and HMACs, and the sealing of a
store made before these chains existed.

Each table of `schema.CHAINED` (runs, consumption, checkpoints, scores, safety_verdicts,
gate_decisions) is one chain in write order: a row's `chain_seq` is its position and its
`chain_hash` is sha256(previous link, b"\\n", the row's digest), the digest being the JSON of
the table name and every column's value except the chain columns, an autoincrement `id`
(the chain order stands for it: `verify` checks the ids rise along the chain) and the run's
trajectory head in `runs` (it changes with every add). The table's head (count, last link)
is in `chain_heads`.

The trajectories of a run are chained by their content hashes (`prev_hash`, see
`safactory.data.codec`); on top of that the run's row chain links each trajectory's content
hash and ingest time (`trajectory_link`): `runs.traj_link` is its last link.

With a key (`SAFACTORY_STORE_KEY` in the environment of the writer, or `key=`), every head
carries an HMAC-SHA256 (`chain_heads.mac`, `runs.traj_mac`): whoever edits rows and
recomputes the plain sha256 links and heads cannot recompute those. The database never
holds the key.

A store made before the chains existed gets them on its first open (`seal_store`): its rows
are sealed as they are found then, and the store records when and how many
(`safactory_meta.integrity`), so `verify` can say that those rows are proven unchanged since
that moment, not before.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic_core import to_json
from sqlalchemy import Boolean, Column, Float, Integer, Table, bindparam, insert, select, update
from sqlalchemy.engine import Connection

from safactory.data.schema import CHAINED, RUN_HEAD_COLUMNS, add_missing_columns, chain_heads, meta_table, runs
from safactory.data.schema import trajectories as trajectories_table
from safactory.data.sql import _cursor, _mark, _name

KEY_ENV = "SAFACTORY_STORE_KEY"
RUN_SCOPE = "trajectories:"  # + run id: the scope of a run's trajectories (a table's scope is its name)
INTEGRITY_KEY = "integrity"  # safactory_meta key: when the chains began, what was sealed as found
_NOT_DIGESTED = {"chain_seq", "chain_hash", *RUN_HEAD_COLUMNS}


def store_key() -> bytes | None:
    """The HMAC key from the environment (`SAFACTORY_STORE_KEY`), or None."""
    value = os.environ.get(KEY_ENV, "")
    return value.encode() if value else None


# ---- links, digests and MACs ----------------------------------------------------------------
@cache
def digested_columns(table: Table) -> tuple[Column, ...]:
    """The columns a row's link covers."""
    has_serial_id = "id" in table.c and isinstance(table.c.id.type, Integer)
    return tuple(c for c in table.c if c.name not in _NOT_DIGESTED and not (has_serial_id and c.name == "id"))


def _value(column: Column, value: Any) -> Any:
    """A column's value as its digest takes it: the type the column declares (SQLite hands back a
    stored bool as 0/1 and a -0.0 as 0.0); a value of another type is kept as it is, and so differs."""
    if value is None:
        return None
    kind = column.type
    if isinstance(kind, Boolean):
        return bool(value) if type(value) is bool or (type(value) is int and value in (0, 1)) else value
    if isinstance(kind, Float):
        return float(value) + 0.0 if type(value) in (int, float) else value
    return value


def row_digest(table: Table, row: Mapping[str, Any]) -> bytes:
    return to_json([table.name, *(_value(c, row[c.name]) for c in digested_columns(table))])


def row_link(prev: str, table: Table, row: Mapping[str, Any]) -> str:
    """The link of `row` after the link `prev` ("" for a table's first row)."""
    return hashlib.sha256(prev.encode() + b"\n" + row_digest(table, row)).hexdigest()


def trajectory_link(prev: str, content_hash: str, created_at: float) -> str:
    """The link of a trajectory in its run's row chain: its content hash and ingest time."""
    return hashlib.sha256(f"{prev}\n{content_hash}\n{float(created_at)!r}".encode()).hexdigest()


def _mac(key: bytes | None, *parts: object) -> str:
    if key is None:
        return ""
    return hmac.new(key, "\n".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()


def table_mac(key: bytes | None, table: str, n: int, link: str) -> str:
    """HMAC of a table's head ("" without a key)."""
    return _mac(key, "table", table, n, link)


def run_mac(key: bytes | None, run_id: str, n: int, head_hash: str, traj_link: str) -> str:
    """HMAC of a run's trajectory head ("" without a key)."""
    return _mac(key, "trajectories", run_id, n, head_hash, traj_link)


def mac_ok(key: bytes, stored: str | None, expected: str) -> bool:
    return hmac.compare_digest(stored or "", expected)


# ---- appending to a table's chain -------------------------------------------------------------
@dataclass
class Head:
    """A table's chain head as read under its lock: rows in the chain, last link."""

    table: Table
    n: int
    link: str


def lock_head(conn: Connection, table: Table) -> Head:
    """Take `table`'s chain head for this transaction (SQLite: the database's write lock; PostgreSQL:
    its head row), so concurrent writers of the table chain one after the other."""
    if conn.dialect.name == "sqlite":
        driver = conn.connection.driver_connection
        if not driver.in_transaction:  # type: ignore[union-attr]
            with _cursor(conn) as cursor:
                cursor.execute("BEGIN IMMEDIATE")
    lock = " FOR UPDATE" if conn.dialect.name == "postgresql" else ""
    sql = f"SELECT n, link FROM {_name(conn, chain_heads)} WHERE scope = {_mark(conn)}{lock}"
    with _cursor(conn) as cursor:
        cursor.execute(sql, (table.name,))
        row = cursor.fetchone()
    if row is None:
        raise RuntimeError(
            f"the store has no chain head for {table.name}: its chain_heads row was deleted; "
            "nothing was written (run `safactory data verify`)"
        )
    return Head(table, int(row[0]), str(row[1]))


def append(conn: Connection, head: Head, rows: list[dict[str, Any]], key: bytes | None) -> None:
    """Insert `rows` as the next links of `head`'s chain and move the head (under `lock_head`)."""
    if not rows:
        return
    for row in rows:
        head.link = row["chain_hash"] = row_link(head.link, head.table, row)
        row["chain_seq"] = head.n
        head.n += 1
    conn.execute(insert(head.table), rows)
    _store_head(conn, head, key)


def relink_from(conn: Connection, head: Head, first: int, key: bytes | None) -> None:
    """After rows at positions >= `first` were deleted from `head`'s chain: renumber and relink the
    rows that followed them, and move the head (under `lock_head`)."""
    table = head.table
    link = ""
    if first > 0:
        before = conn.execute(select(table.c.chain_hash).where(table.c.chain_seq == first - 1)).scalar()
        link = before or ""
    rest = conn.execute(select(table).where(table.c.chain_seq >= first).order_by(table.c.chain_seq)).mappings().all()
    head.n, head.link = first, link
    _link_rows(conn, head, rest)
    _store_head(conn, head, key)


def _link_rows(conn: Connection, head: Head, rows: list[Any]) -> None:
    """Give stored `rows` (in chain order) the next positions and links after `head`, and advance it."""
    table = head.table
    keys = list(table.primary_key)
    params = []
    for row in rows:
        head.link = row_link(head.link, table, row)
        params.append({**{f"k_{k.name}": row[k.name] for k in keys}, "s_seq": head.n, "s_hash": head.link})
        head.n += 1
    if params:
        stmt = (
            update(table)
            .where(*(k == bindparam(f"k_{k.name}") for k in keys))
            .values(chain_seq=bindparam("s_seq"), chain_hash=bindparam("s_hash"))
        )
        conn.execute(stmt, params)


def _store_head(conn: Connection, head: Head, key: bytes | None) -> None:
    name = head.table.name
    conn.execute(
        update(chain_heads)
        .where(chain_heads.c.scope == name)
        .values(n=head.n, link=head.link, mac=table_mac(key, name, head.n, head.link))
    )


def mac_heads(conn: Connection, heads: Mapping[str, tuple[int, str]], key: bytes) -> list[str]:
    """Give each head of `heads` (scope -> rows, last link, as a clean check found it) its HMAC under
    `key`, where the stored head is still that one (for a store written without the key); returns
    the scopes whose head moved meanwhile (left as they are)."""
    if conn.dialect.name == "sqlite":
        driver = conn.connection.driver_connection
        if not driver.in_transaction:  # type: ignore[union-attr]
            with _cursor(conn) as cursor:
                cursor.execute("BEGIN IMMEDIATE")
    moved = []
    for scope, (n, link) in sorted(heads.items()):
        if scope.startswith(RUN_SCOPE):
            run_id = scope.removeprefix(RUN_SCOPE)
            same = (runs.c.id == run_id, runs.c.n_trajectories == n, runs.c.traj_link == link)
            head_hash = conn.execute(select(runs.c.head_hash).where(*same)).scalar()
            done = (
                head_hash is not None
                and conn.execute(
                    update(runs).where(*same).values(traj_mac=run_mac(key, run_id, n, head_hash, link))
                ).rowcount
            )
        else:
            same = (chain_heads.c.scope == scope, chain_heads.c.n == n, chain_heads.c.link == link)
            done = conn.execute(update(chain_heads).where(*same).values(mac=table_mac(key, scope, n, link))).rowcount
        if not done:
            moved.append(scope)
    return moved


# ---- sealing a store made before the chains ---------------------------------------------------
def _legacy_order(table: Table) -> list[Any]:
    if table is runs:
        return [runs.c.created_at, runs.c.id]
    return list(table.primary_key)


def seal_store(conn: Connection, key: bytes | None) -> None:
    """Give the store its chains if it has none yet (in the transaction of `conn`, on open): add the
    missing columns and chain heads, link every row as found, and record when and how many.
    A fresh store records that nothing was sealed as found."""
    if conn.execute(select(meta_table.c.value).where(meta_table.c.key == INTEGRITY_KEY)).first() is not None:
        return
    if conn.dialect.name == "sqlite":
        driver = conn.connection.driver_connection
        if not driver.in_transaction:  # type: ignore[union-attr]
            with _cursor(conn) as cursor:
                cursor.execute("BEGIN IMMEDIATE")
        found = conn.execute(select(meta_table.c.value).where(meta_table.c.key == INTEGRITY_KEY)).first()
        if found is not None:  # another process sealed it meanwhile
            return
    add_missing_columns(conn)
    sealed: dict[str, int] = {}
    for table in CHAINED:
        rows = conn.execute(select(table).order_by(*_legacy_order(table))).mappings().all()
        head = Head(table, 0, "")
        _link_rows(conn, head, rows)
        conn.execute(insert(chain_heads).values(scope=table.name, n=head.n, link=head.link, mac=""))
        _store_head(conn, head, key)
        if rows:
            sealed[table.name] = len(rows)
    n_trajectories = _seal_trajectory_chains(conn, key)
    if n_trajectories:
        sealed["trajectories"] = n_trajectories
    record = {"version": 1, "since": time.time(), "sealed_as_found": sealed}
    conn.execute(insert(meta_table).values(key=INTEGRITY_KEY, value=json.dumps(record, sort_keys=True)))


def _seal_trajectory_chains(conn: Connection, key: bytes | None) -> int:
    """Each run's trajectory row chain, up to its recorded head, as found; returns how many were linked."""
    total = 0
    heads = conn.execute(select(runs.c.id, runs.c.n_trajectories, runs.c.head_hash)).all()
    t = trajectories_table
    for run_id, n, head_hash in heads:
        link = ""
        stmt = select(t.c.content_hash, t.c.created_at).where(t.c.run_id == run_id).order_by(t.c.seq).limit(n)
        for content, created_at in conn.execute(stmt):
            link = trajectory_link(link, content, created_at)
            total += 1
        mac = run_mac(key, run_id, n, head_hash, link)
        conn.execute(update(runs).where(runs.c.id == run_id).values(traj_link=link, traj_mac=mac))
    return total


def integrity_record(conn: Connection) -> dict[str, Any]:
    """What `seal_store` recorded: {"since": time, "sealed_as_found": {table: rows}}, or {} if nothing."""
    value = conn.execute(select(meta_table.c.value).where(meta_table.c.key == INTEGRITY_KEY)).scalar()
    if value is None:
        return {}
    try:
        record = json.loads(value)
    except ValueError:
        return {"damaged": value}
    return record if isinstance(record, dict) else {"damaged": value}
