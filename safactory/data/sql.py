"""Dialect helpers of the store: the engine (SQLite pragmas and busy timeout), and the
ingest path's plain SQL on the driver's own cursor.

The ingest path talks to the driver directly, on the connection (and so in the transaction)
of the SQLAlchemy `Connection`: plain SQL and tuples of str, int, float, bool, bytes or
None, which both sqlite3 and psycopg take as they are. SQLAlchemy's statement compilation
and per-value processing would cost about as much as the database work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Table, create_engine, event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from safactory.data.schema import runs

_SQLITE_BUSY_S = 60.0


def make_engine(url: str) -> Engine:
    """The engine of a store URL; a SQLite file gets its directory, WAL mode and synchronous=FULL."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # SQLite: a writer waits up to a minute for another process's transaction (the driver's 5 s
    # default fails a second writer during one long batch with "database is locked")
    connect_args = {"timeout": _SQLITE_BUSY_S} if url.startswith("sqlite") else {}
    engine = create_engine(url, connect_args=connect_args)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


@contextmanager
def _cursor(conn: Connection) -> Iterator[Any]:
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        yield cursor
    finally:
        cursor.close()


def _mark(conn: Connection) -> str:
    return "?" if conn.dialect.paramstyle == "qmark" else "%s"


def _name(conn: Connection, table: Table, column: str | None = None) -> str:
    preparer = conn.dialect.identifier_preparer
    return preparer.format_table(table) if column is None else preparer.quote(column)


def _insert_new(conn: Connection, table: Table) -> Any:
    """INSERT into `table` that skips rows whose primary key is already there (ON CONFLICT DO NOTHING)."""
    insert = postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert
    return insert(table).on_conflict_do_nothing()


def _lock_runs(conn: Connection, run_ids: list[str]) -> None:
    """Take the rows of these runs for this transaction (SQLite: the database's write lock).

    Concurrent adds to a run then serialise: each reads the stored ids and the chain head
    that the one before it committed, so none skips a check or chains onto a stale head."""
    driver = conn.connection.driver_connection
    with _cursor(conn) as cursor:
        if conn.dialect.name == "sqlite" and not driver.in_transaction:  # type: ignore[union-attr]
            cursor.execute("BEGIN IMMEDIATE")
            return
        marks = ", ".join([_mark(conn)] * len(run_ids))
        if conn.dialect.name == "postgresql":
            cursor.execute(f"SELECT id FROM {_name(conn, runs)} WHERE id IN ({marks}) ORDER BY id FOR UPDATE", run_ids)
        else:
            cursor.execute(
                f"UPDATE {_name(conn, runs)} SET n_trajectories = n_trajectories WHERE id IN ({marks})", run_ids
            )


def _select_in(
    conn: Connection, table: Table, cols: tuple[str, ...], key: str, values: list[Any], chunk: int = 900
) -> list[tuple[Any, ...]]:
    """Rows (`cols`) of `table` whose `key` is one of `values`."""
    mark = _mark(conn)
    names = ", ".join(_name(conn, table, c) for c in cols)
    head = f"SELECT {names} FROM {_name(conn, table)} WHERE {_name(conn, table, key)} IN "
    out: list[tuple[Any, ...]] = []
    with _cursor(conn) as cursor:
        for start in range(0, len(values), chunk):
            part = values[start : start + chunk]
            cursor.execute(head + f"({', '.join([mark] * len(part))})", tuple(part))
            out += cursor.fetchall()
    return out


def _bulk_insert(conn: Connection, table: Table, cols: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    """Insert `rows` in the current transaction, on the driver's own cursor: executemany,
    or on psycopg a COPY, which skips the per-row protocol round of an executemany."""
    if not rows:
        return
    names = ", ".join(_name(conn, table, c) for c in cols)
    with _cursor(conn) as cursor:
        if conn.dialect.driver == "psycopg":
            with cursor.copy(f"COPY {_name(conn, table)} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ", ".join([_mark(conn)] * len(cols))
            cursor.executemany(f"INSERT INTO {_name(conn, table)} ({names}) VALUES ({marks})", rows)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # an acknowledged trajectory survives power loss too
    cur.close()
