"""TrajectoryStore: every trajectory, token-exact, with integrity hashes and lineage, on SQLAlchemy.

SQLite (WAL mode) is the embedded default; a PostgreSQL URL works with the same
code. This file owns the store's API: opening (`store_url`), runs, ingest and reads, and
the error a damaged row raises (`CorruptRecordError`). Its parts live beside it: the
tables and schema version in `schema`, the row codec in `rows`, the dialect SQL in `sql`,
consumption, checkpoints and judgements in `ledger`.

Ingest is idempotent (an id already stored is skipped) and transactional; each
trajectory gets a sha256 content hash and the previous hash of its run (a per-run
chain) that `safactory.data.integrity.verify` walks; the run's row chain and head
(with an HMAC under a key) are kept in its runs row (`safactory.data.seal`). The content
hash is taken over the very texts and blobs the rows hold
(`safactory.data.codec.encode_trajectory`), so each part of a trajectory is serialised once,
by pydantic-core.

Reads check each trajectory against its rows (`safactory.data.rows.row_problem`: its steps
against `n_steps`, its derived columns, its content hash over the stored texts and blobs)
and refuse one that does not match with a CorruptRecordError; `verify` checks the chains.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from safactory.data.codec import StoredTrace
from safactory.data.ledger import StoreLedger
from safactory.data.rows import TaskHashes, _blob_ids, _rows, _step, _task_rows, _trace, _trajectory, row_problem
from safactory.data.schema import (
    STEP_COLUMNS,
    TASK_COLUMNS,
    TRACE_COLUMNS,
    TRAJECTORY_COLUMNS,
    consumption,
    runs,
    set_up_schema,
    steps,
    tasks,
    token_traces,
    trajectories,
)
from safactory.data.seal import append, lock_head, run_mac, seal_store, store_key, trajectory_link
from safactory.data.sql import _bulk_insert, _cursor, _insert_new, _lock_runs, _mark, _name, _select_in, make_engine
from safactory.types import Trajectory, canonical_json, sha256_hex

if TYPE_CHECKING:
    from safactory.data.redact import Redactor

_OPEN_ATTEMPTS = 5  # tries at setting up the schema when other processes open the same new store


def store_url(db: str, *, existing: bool = False) -> str:
    """A SQLAlchemy URL from `--db`: a URL as is; a directory, or a path without a suffix that does
    not exist yet (a run directory to be), gets `store.db` inside; any other path is that SQLite file.

    With `existing` (commands that read a store), a SQLite file that is not there is an error
    rather than a new empty store: a mistyped `--db` must not look like an empty store.
    """
    if "://" in db:
        url = db
    else:
        path = Path(db).expanduser()
        directory = path.is_dir() or (not path.exists() and not path.suffix)
        url = f"sqlite:///{(path / 'store.db' if directory else path).resolve()}"
    if existing and url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise FileNotFoundError(f"no store at {db!r} ({url.removeprefix('sqlite:///')} does not exist)")
    return url


class CorruptRecordError(ValueError):
    """A stored row that cannot be read back as a trajectory (edited or damaged in the database)."""

    def __init__(self, trajectory_id: str, detail: str) -> None:
        super().__init__(f"trajectory {trajectory_id}: {detail}")
        self.trajectory_id = trajectory_id


@contextmanager
def _reading(trajectory_id: str, part: str = "row") -> Iterator[None]:
    """Turn a row that does not decode or validate into a CorruptRecordError naming its trajectory."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError and ValidationError are ValueErrors
        raise CorruptRecordError(trajectory_id, f"stored {part} cannot be read: {exc}") from exc


class Loaded(NamedTuple):
    """A trajectory as read, with its place and whether its rows match its content."""

    seq: int
    created_at: float
    traj: Trajectory
    problem: str | None  # why its rows do not match its content (`row_problem`), or None


class TrajectoryStore(StoreLedger):
    """Durable, append-only trajectory storage on any SQLAlchemy URL."""

    def __init__(self, url: str, *, redactor: Redactor | None = None, key: bytes | None = None) -> None:
        """`redactor`: when given, every trajectory is redacted (secrets, emails, ...) before it is stored.
        `key`: the HMAC key of the chain heads (default: `SAFACTORY_STORE_KEY` from the environment, if set)."""
        self.url = url
        self.redactor = redactor
        self.key = key if key is not None else store_key()
        self._task_hashes = TaskHashes()
        self.engine: Engine = make_engine(url)
        for attempt in range(1, _OPEN_ATTEMPTS + 1):
            try:
                with self.engine.begin() as conn:
                    set_up_schema(conn, url)
                    seal_store(conn, self.key)  # a store made before the chains: sealed as found, once
                break
            except DBAPIError:  # another process created the same tables or meta row at the same moment
                if attempt == _OPEN_ATTEMPTS:
                    raise
                time.sleep(0.05 * attempt)

    @classmethod
    def in_dir(cls, directory: str | Path, *, redactor: Redactor | None = None) -> TrajectoryStore:
        return cls(f"sqlite:///{Path(directory).resolve() / 'store.db'}", redactor=redactor)

    def close(self) -> None:
        self.engine.dispose()

    # ---- runs -------------------------------------------------------------------------
    def create_run(self, run_id: str, config: dict[str, Any], code_version: str = "") -> None:
        """Record a run; a run that already exists is left as it is (also when two processes race)."""
        text = canonical_json(config)
        row = {
            "id": run_id,
            "created_at": time.time(),
            "config": text,
            "config_hash": sha256_hex(text),
            "code_version": code_version,
            "n_trajectories": 0,
            "head_hash": "",
            "traj_link": "",
            "traj_mac": run_mac(self.key, run_id, 0, "", ""),
        }
        with self.engine.begin() as conn:
            head = lock_head(conn, runs)
            if conn.execute(select(runs.c.id).where(runs.c.id == run_id)).first() is None:
                append(conn, head, [row], self.key)

    def run_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(runs.c.id).order_by(runs.c.created_at)).scalars())

    def trajectory_run_ids(self) -> list[str]:
        """The distinct run ids of the stored trajectories (recorded runs or not)."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(trajectories.c.run_id).distinct()).scalars())

    def run_info(self, run_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).mappings().first()
        if row is None:
            raise KeyError(f"no run {run_id!r} in {self.url}")
        return dict(row)

    # ---- ingest -----------------------------------------------------------------------
    def add(self, items: Iterable[Trajectory]) -> int:
        """Store trajectories in one transaction; returns how many were new. Once this
        returns, they are durable (acknowledged). Ids already stored are skipped."""
        batch = list(items)
        if not batch:
            return 0
        for traj in batch:
            if not math.isfinite(traj.reward):
                raise ValueError(f"trajectory {traj.id} has a non-finite reward ({traj.reward}); nothing was stored")
        if self.redactor is not None:
            batch = [self.redactor.redact_trajectory(t) for t in batch]
        with self.engine.begin() as conn:
            _lock_runs(conn, sorted({t.run_id for t in batch}))
            known = {r[0] for r in _select_in(conn, trajectories, ("id",), "id", [t.id for t in batch])}
            fresh: list[Trajectory] = []
            for traj in batch:
                if traj.id not in known:
                    known.add(traj.id)
                    fresh.append(traj)
            if not fresh:
                return 0
            task_rows = _task_rows(fresh, self._task_hashes)
            self._insert_tasks(conn, task_rows)
            heads = self._heads(conn, {t.run_id for t in fresh})
            now = time.time()
            traj_rows, step_rows, trace_rows = [], [], []
            for traj in fresh:
                if traj.run_id not in heads:
                    raise KeyError(f"run {traj.run_id!r} does not exist; call create_run first")
                count, last, link = heads[traj.run_id]
                _rows(traj, last, now, traj_rows, step_rows, trace_rows)
                heads[traj.run_id] = (count + 1, traj.content_hash, trajectory_link(link, traj.content_hash, now))
            _bulk_insert(conn, trajectories, TRAJECTORY_COLUMNS, traj_rows)
            _bulk_insert(conn, steps, STEP_COLUMNS, step_rows)
            _bulk_insert(conn, token_traces, TRACE_COLUMNS, trace_rows)
            mark = _mark(conn)
            marks = ", ".join(f"{c} = {mark}" for c in ("n_trajectories", "head_hash", "traj_link", "traj_mac"))
            with _cursor(conn) as cursor:
                cursor.executemany(
                    f"UPDATE {_name(conn, runs)} SET {marks} WHERE id = {mark}",
                    [
                        (count, last, link, run_mac(self.key, run_id, count, last, link), run_id)
                        for run_id, (count, last, link) in heads.items()
                    ],
                )
        return len(fresh)

    @staticmethod
    def _insert_tasks(conn: Connection, rows: dict[str, tuple[Any, ...]]) -> None:
        """Insert the tasks not stored yet; one that another writer inserts meanwhile is skipped."""
        known = {r[0] for r in _select_in(conn, tasks, ("hash",), "hash", list(rows))}
        fresh = [r for h, r in rows.items() if h not in known]
        if fresh:
            conn.execute(_insert_new(conn, tasks), [dict(zip(TASK_COLUMNS, r, strict=True)) for r in fresh])

    @staticmethod
    def _heads(conn: Connection, run_ids: set[str]) -> dict[str, tuple[int, str, str]]:
        """(count, last content hash, last row-chain link) of each run."""
        rows = _select_in(conn, runs, ("id", "n_trajectories", "head_hash", "traj_link"), "id", list(run_ids))
        return {r[0]: (r[1], r[2], r[3] or "") for r in rows}

    # ---- read -------------------------------------------------------------------------
    def get(self, ids: list[str]) -> list[Trajectory]:
        """Trajectories by id, in the order asked; raises KeyError for an unknown id and
        CorruptRecordError for one whose rows do not match its content."""
        found: dict[str, Trajectory] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                found.update((x.traj.id, x.traj) for x in self._load(conn, trajectories.c.id.in_(chunk)))
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"trajectories not in store: {missing[:5]}")
        return [found[i] for i in ids]

    def query(
        self,
        *,
        run_id: str | None = None,
        kind: str | None = None,
        split: str | None = None,
        unconsumed_by: str | None = None,
        limit: int | None = None,
    ) -> list[Trajectory]:
        """Trajectories in insertion order, filtered."""
        return list(self.iter(run_id=run_id, kind=kind, split=split, unconsumed_by=unconsumed_by, limit=limit))

    def iter(
        self,
        *,
        run_id: str | None = None,
        kind: str | None = None,
        split: str | None = None,
        unconsumed_by: str | None = None,
        limit: int | None = None,
        chunk: int = 500,
    ) -> Iterator[Trajectory]:
        """Like `query`, streaming in chunks of `chunk` trajectories (constant memory). A trajectory
        whose rows do not match its content raises CorruptRecordError naming it."""
        conds = self._conds(run_id=run_id, kind=kind, split=split, unconsumed_by=unconsumed_by)
        return (x.traj for x in self._pages(None, conds, limit, chunk, check=True))

    def scan(self, conn: Connection, *, run_id: str | None = None, chunk: int = 500) -> Iterator[Loaded]:
        """Every trajectory (of `run_id`) on `conn`, in insertion order, each with the result of its
        row check instead of an error (for `verify`, which reads one `snapshot`)."""
        return self._pages(conn, self._conds(run_id=run_id), None, chunk, check=False)

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A connection that reads one consistent state of the store while it is open (a read
        transaction: SQLite's WAL snapshot, PostgreSQL's REPEATABLE READ); writers go on meanwhile."""
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            else:
                with _cursor(conn) as cursor:
                    cursor.execute("BEGIN")
            yield conn

    def count(self, *, run_id: str | None = None, kind: str | None = None, split: str | None = None) -> int:
        stmt = select(func.count()).select_from(trajectories).where(*self._conds(run_id=run_id, kind=kind, split=split))
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    @staticmethod
    def _conds(
        *,
        run_id: str | None = None,
        kind: str | None = None,
        split: str | None = None,
        unconsumed_by: str | None = None,
    ) -> list[Any]:
        conds: list[Any] = []
        if run_id is not None:
            conds.append(trajectories.c.run_id == run_id)
        if kind is not None:
            conds.append(trajectories.c.kind == kind)
        if split is not None:
            conds.append(trajectories.c.split == split)
        if unconsumed_by is not None:
            used = select(consumption.c.trajectory_id).where(consumption.c.consumer == unconsumed_by)
            conds.append(~trajectories.c.id.in_(used))
        return conds

    def _pages(
        self, conn: Connection | None, conds: list[Any], limit: int | None, chunk: int, check: bool
    ) -> Iterator[Loaded]:
        """Pages of `chunk` trajectories in insertion order (each page on its own connection unless `conn`)."""
        after = 0
        left = limit
        while left is None or left > 0:
            n = chunk if left is None else min(chunk, left)
            page_conds = (*conds, trajectories.c.seq > after)
            if conn is None:
                with self.engine.connect() as own:
                    page = self._load(own, *page_conds, limit=n, check=check)
            else:
                page = self._load(conn, *page_conds, limit=n, check=check)
            if not page:
                return
            yield from page
            after = page[-1].seq
            if left is not None:
                left -= len(page)
            if len(page) < n:
                return

    def _load(self, conn: Connection, *conds: Any, limit: int | None = None, check: bool = True) -> list[Loaded]:
        """The trajectories matching `conds` in insertion order, each checked against its rows
        (`row_problem`): with `check`, the first that does not match raises CorruptRecordError."""
        stmt = select(trajectories, tasks.c.body.label("task_body")).outerjoin(
            tasks, tasks.c.hash == trajectories.c.task_hash
        )
        stmt = stmt.where(*conds).order_by(trajectories.c.seq)
        if limit is not None:
            stmt = stmt.limit(limit)
        rows = conn.execute(stmt).mappings().all()
        out: list[Loaded] = []
        for r in rows:
            with _reading(r["id"]):
                if r["task_body"] is None:
                    raise KeyError(f"its task {r['task_hash'][:12]} is not stored")
                traj = _trajectory(r)
            out.append(Loaded(r["seq"], r["created_at"], traj, None))
        if not out:
            return out
        parts = self._attach_steps(conn, {x.traj.id: x.traj for x in out})
        body_hashes: dict[str, str] = {}
        for i, (loaded, r) in enumerate(zip(out, rows, strict=True)):
            digest = body_hashes.get(r["task_hash"])
            if digest is None:
                digest = body_hashes[r["task_hash"]] = hashlib.sha256(r["task_body"].encode()).hexdigest()
            problem = row_problem(r, loaded.traj, digest, *parts[loaded.traj.id])
            if problem is not None:
                if check:
                    raise CorruptRecordError(loaded.traj.id, f"modified in the database: {problem}")
                out[i] = loaded._replace(problem=problem)
        return out

    @staticmethod
    def _attach_steps(
        conn: Connection, by_id: dict[str, Trajectory]
    ) -> dict[str, tuple[list[tuple[str, str, str]], list[StoredTrace | None], int]]:
        """Attach the steps and token traces; return, per trajectory, what `row_problem` checks:
        the step texts, the stored trace of each step (or None) and how many trace rows fit no step."""
        ids = list(by_id)
        texts: dict[str, list[tuple[str, str, str]]] = {tid: [] for tid in ids}
        step_rows = conn.execute(
            select(steps).where(steps.c.trajectory_id.in_(ids)).order_by(steps.c.trajectory_id, steps.c.idx)
        ).mappings()
        for r in step_rows:
            with _reading(r["trajectory_id"], f"step {r['idx']}"):
                step = _step(r)
            by_id[r["trajectory_id"]].steps.append(step)
            texts[r["trajectory_id"]].append((r["action"], r["observation"], r["info"]))
        trace_rows = conn.execute(
            select(token_traces)
            .where(token_traces.c.trajectory_id.in_(ids))
            .order_by(token_traces.c.trajectory_id, token_traces.c.turn)
        ).mappings()
        previous: dict[str, list[int]] = {}
        stored: dict[str, dict[int, StoredTrace]] = {}
        stray: dict[str, int] = {}
        for r in trace_rows:
            tid = r["trajectory_id"]
            with _reading(tid, f"token trace {r['turn']}"):
                prev = previous.get(tid, [])
                prompt = prev[: r["prefix_len"]] + _blob_ids(r["prompt_suffix"])
                completion = _blob_ids(r["completion_ids"])
                previous[tid] = prompt + completion
                step_list = by_id[tid].steps
                if not 0 <= r["turn"] < len(step_list) or step_list[r["turn"]].index != r["turn"]:
                    stray[tid] = stray.get(tid, 0) + 1  # a trace without its step: the row check names it
                    continue
                step_list[r["turn"]].trace = _trace(r, prompt, completion)
            stored.setdefault(tid, {})[r["turn"]] = (
                r["prefix_len"],
                r["prompt_suffix"],
                r["completion_ids"],
                r["logprobs"],
            )
        return {
            tid: (texts[tid], [stored.get(tid, {}).get(i) for i in range(len(traj.steps))], stray.get(tid, 0))
            for tid, traj in by_id.items()
        }
