"""TrajectoryStore: every trajectory, token-exact, with integrity hashes and lineage, on SQLAlchemy.

SQLite (WAL mode) is the embedded default; a PostgreSQL URL works with the same
code. The schema is versioned (`safactory_meta.schema_version`, checked on open; a
version-3 store has the same tables and is marked 4 on open, its trajectories keeping
their version-3 hashes).

Layout (storage grows linearly with the number of steps):
  runs            config, config hash, code version, chain head (count + last hash)
  tasks           each distinct task once, by its hash
  trajectories    one row per episode (append-only): provenance, outcome, hashes
  steps           one row per turn: action, observation, reward, info, error
  token_traces    one row per sampled turn: int32/float32 blobs; a turn stores only
                  the prompt tokens that are new since the previous turn
  consumption     which training step of which consumer (training run) used each
                  trajectory: exactly once per consumer
  checkpoints     policy versions: weights hash, parent, training step, path
  scores, safety_verdicts   judgements attached to trajectories

Ingest is idempotent (an id already stored is skipped) and transactional; each
trajectory gets a sha256 content hash and the previous hash of its run (a per-run
chain) that `safactory.data.integrity.verify` walks. The content hash is taken over the
very texts and blobs the rows hold (`safactory.types.encode_trajectory`), so each part
of a trajectory is serialised once, by pydantic-core.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic_core import to_json
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from safactory.types import (
    SCHEMA_VERSION,
    Step,
    Task,
    TokenTrace,
    Trajectory,
    canonical_json,
    encode_trajectory,
    sha256_hex,
)

if TYPE_CHECKING:
    from safactory.data.redact import Redactor

metadata = MetaData()

meta_table = Table("safactory_meta", metadata, Column("key", Text, primary_key=True), Column("value", Text))

runs = Table(
    "runs",
    metadata,
    Column("id", Text, primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("config", Text, nullable=False),
    Column("config_hash", String(64), nullable=False),
    Column("code_version", Text, nullable=False),
    Column("n_trajectories", Integer, nullable=False),
    Column("head_hash", String(64), nullable=False),
)

tasks = Table(
    "tasks",
    metadata,
    Column("hash", String(64), primary_key=True),
    Column("task_id", Text, nullable=False),
    Column("env_id", Text, nullable=False),
    Column("split", Text, nullable=False),
    Column("body", Text, nullable=False),
)

trajectories = Table(
    "trajectories",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", Text, unique=True, nullable=False),
    Column("run_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("group_id", Text, nullable=False, index=True),
    Column("task_hash", String(64), nullable=False, index=True),
    Column("task_id", Text, nullable=False),
    Column("split", Text, nullable=False),
    Column("env_id", Text, nullable=False),
    Column("env_version", Text, nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("policy_version", Integer, nullable=True),
    Column("n_steps", Integer, nullable=False),
    Column("reward", Float, nullable=False),
    Column("success", Boolean, nullable=False),
    Column("termination", Text, nullable=False),
    Column("error", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("meta", Text, nullable=False),
    Index("ix_traj_run_kind", "run_id", "kind", "seq"),
)

steps = Table(
    "steps",
    metadata,
    Column("trajectory_id", Text, primary_key=True),
    Column("idx", Integer, primary_key=True),
    Column("action", Text, nullable=False),
    Column("observation", Text, nullable=False),
    Column("reward", Float, nullable=True),
    Column("info", Text, nullable=False),
    Column("error", Text, nullable=True),
)

token_traces = Table(
    "token_traces",
    metadata,
    Column("trajectory_id", Text, primary_key=True),
    Column("turn", Integer, primary_key=True),
    Column("policy_version", Integer, nullable=False),
    Column("policy_versions", Text, nullable=False),
    Column("temperature", Float, nullable=False),
    Column("top_p", Float, nullable=False),
    Column("finish_reason", Text, nullable=False),
    Column("prefix_len", Integer, nullable=False),
    Column("prompt_suffix", LargeBinary, nullable=False),
    Column("completion_ids", LargeBinary, nullable=False),
    Column("logprobs", LargeBinary, nullable=True),
)

consumption = Table(
    "consumption",
    metadata,
    Column("consumer", Text, primary_key=True),
    Column("trajectory_id", Text, primary_key=True),
    Column("train_step", Integer, nullable=False),
    Column("consumed_at", Float, nullable=False),
    Index("ix_consumption_step", "consumer", "train_step"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("run_id", Text, primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("parent_version", Integer, nullable=True),
    Column("train_step", Integer, nullable=False),
    Column("weights_hash", String(64), nullable=False),
    Column("path", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("meta", Text, nullable=False),
)

scores = Table(
    "scores",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("trajectory_id", Text, nullable=False, index=True),
    Column("judge", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("value", Float, nullable=False),
    Column("meta", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

safety_verdicts = Table(
    "safety_verdicts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("trajectory_id", Text, nullable=False, index=True),
    Column("judge", Text, nullable=False),
    Column("judge_version", Text, nullable=False),
    Column("unsafe", Boolean, nullable=False),
    Column("severity", Float, nullable=False),
    Column("reasons", Text, nullable=False),
    Column("meta", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

gate_decisions = Table(
    "gate_decisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Text, nullable=False, index=True),
    Column("candidate_version", Integer, nullable=False),
    Column("baseline_version", Integer, nullable=False),
    Column("accepted", Boolean, nullable=False),
    Column("reasons", Text, nullable=False),
    Column("decision", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

_SQLITE_BUSY_S = 60.0
_OPEN_ATTEMPTS = 5  # tries at setting up the schema when other processes open the same new store
_UPGRADABLE = {3}  # store schemas opened as they are and marked as SCHEMA_VERSION

TASK_COLUMNS = ("hash", "task_id", "env_id", "split", "body")
TRAJECTORY_COLUMNS = (
    "id",
    "run_id",
    "kind",
    "group_id",
    "task_hash",
    "task_id",
    "split",
    "env_id",
    "env_version",
    "seed",
    "policy_version",
    "n_steps",
    "reward",
    "success",
    "termination",
    "error",
    "created_at",
    "content_hash",
    "prev_hash",
    "meta",
)
STEP_COLUMNS = ("trajectory_id", "idx", "action", "observation", "reward", "info", "error")
TRACE_COLUMNS = (
    "trajectory_id",
    "turn",
    "policy_version",
    "policy_versions",
    "temperature",
    "top_p",
    "finish_reason",
    "prefix_len",
    "prompt_suffix",
    "completion_ids",
    "logprobs",
)


def _blob_ids(blob: bytes) -> list[int]:
    return np.frombuffer(blob, dtype="<i4").astype(np.int64).tolist()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


_task_json = Task.__pydantic_serializer__.to_json


class TaskHashes:
    """Task hashes by the task's pydantic JSON: a task seen before (a group's trajectories,
    the next epoch) skips its sorted-key canonical JSON. Equal pydantic JSON means an equal
    task (the canonical form only adds key sorting); bounded, cleared when full."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._by_json: dict[bytes, tuple[str, str]] = {}

    def get(self, task: Task) -> tuple[str, str]:
        """(hash, canonical JSON body) of `task`."""
        key = _task_json(task)
        found = self._by_json.get(key)
        if found is None:
            body = canonical_json(task.model_dump())
            found = (sha256_hex(body), body)
            if len(self._by_json) >= self.size:
                self._by_json.clear()
            self._by_json[key] = found
        return found


def _task_rows(items: list[Trajectory], hashes: TaskHashes) -> dict[str, tuple[Any, ...]]:
    """Set each trajectory's `task_hash`; return the rows of their distinct tasks, by hash."""
    out: dict[str, tuple[Any, ...]] = {}
    for traj in items:
        task = traj.task
        digest, body = hashes.get(task)
        if digest not in out:
            out[digest] = (digest, task.id, task.env_id, task.split, body)
        traj.task_hash = digest
    return out


def _versions_text(versions: list[int]) -> str:
    if not versions:
        return "[]"
    if len(versions) == 1 and type(versions[0]) is int:
        return f"[{versions[0]}]"
    return to_json(versions).decode()


def _rows(
    traj: Trajectory, prev_hash: str, created_at: float, traj_rows: list, step_rows: list, trace_rows: list
) -> None:
    """Hash and chain one trajectory (its `task_hash` set already by `_task_rows`) and append
    its rows, columns as in *_COLUMNS. The row texts and blobs are the very parts
    `encode_trajectory` hashed, so each is serialised once."""
    enc = encode_trajectory(traj, traj.task_hash)
    # a trajectory recorded as version 3 keeps its original (sorted-key JSON) hash
    traj.content_hash = enc.content_hash if traj.schema_version >= 4 else traj.compute_hash()
    traj.prev_hash = prev_hash
    tid = traj.id
    policy_version: int | None = None
    for index, reward, error, action, observation, info, trace in enc.steps:
        step_rows.append((tid, index, action.decode(), observation.decode(), reward, info.decode(), error))
        if trace is None:
            continue
        version, versions, *rest = trace
        top = max(versions) if versions else version
        if policy_version is None or top > policy_version:
            policy_version = top
        trace_rows.append((tid, index, version, _versions_text(versions), *rest))
    task = traj.task
    traj_rows.append(
        (
            tid,
            traj.run_id,
            traj.kind,
            traj.group_id,
            traj.task_hash,
            task.id,
            task.split,
            traj.env_id,
            traj.env_version,
            traj.seed,
            policy_version,
            len(traj.steps),
            traj.reward + 0.0,
            traj.success,
            traj.termination,
            traj.error,
            created_at,
            traj.content_hash,
            prev_hash,
            enc.meta.decode(),
        )
    )


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


class TrajectoryStore:
    """Durable, append-only trajectory storage on any SQLAlchemy URL."""

    def __init__(self, url: str, *, redactor: Redactor | None = None) -> None:
        """`redactor`: when given, every trajectory is redacted (secrets, emails, ...) before it is stored."""
        self.url = url
        self.redactor = redactor
        self._task_hashes = TaskHashes()
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # SQLite: a writer waits up to a minute for another process's transaction (the driver's 5 s
        # default fails a second writer during one long batch with "database is locked")
        connect_args = {"timeout": _SQLITE_BUSY_S} if url.startswith("sqlite") else {}
        self.engine: Engine = create_engine(url, connect_args=connect_args)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        for attempt in range(1, _OPEN_ATTEMPTS + 1):
            try:
                self._set_up_schema()
                break
            except DBAPIError:  # another process created the same tables or meta row at the same moment
                if attempt == _OPEN_ATTEMPTS:
                    raise
                time.sleep(0.05 * attempt)

    @classmethod
    def in_dir(cls, directory: str | Path) -> TrajectoryStore:
        return cls(f"sqlite:///{Path(directory).resolve() / 'store.db'}")

    def _set_up_schema(self) -> None:
        """Create missing tables, widen old length-limited text columns, check the schema version."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":  # one opener at a time sets up the schema
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('safactory.store.schema'))")
            metadata.create_all(conn)
            if conn.dialect.name == "postgresql":
                _widen_text_columns(conn)
            row = conn.execute(select(meta_table.c.value).where(meta_table.c.key == "schema_version")).first()
            if row is None:
                conn.execute(meta_table.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row[0]) in _UPGRADABLE:
                # same tables; its trajectories keep their version-3 hashes (each records its version)
                conn.execute(
                    update(meta_table).where(meta_table.c.key == "schema_version").values(value=str(SCHEMA_VERSION))
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.url} holds store schema {row[0]}, this safactory speaks {SCHEMA_VERSION}; "
                    "migrate it or use a new store"
                )

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
        }
        with self.engine.begin() as conn:
            conn.execute(_insert_new(conn, runs).values(**row))

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
                count, last = heads[traj.run_id]
                _rows(traj, last, now, traj_rows, step_rows, trace_rows)
                heads[traj.run_id] = (count + 1, traj.content_hash)
            _bulk_insert(conn, trajectories, TRAJECTORY_COLUMNS, traj_rows)
            _bulk_insert(conn, steps, STEP_COLUMNS, step_rows)
            _bulk_insert(conn, token_traces, TRACE_COLUMNS, trace_rows)
            mark = _mark(conn)
            with _cursor(conn) as cursor:
                cursor.executemany(
                    f"UPDATE {_name(conn, runs)} SET n_trajectories = {mark}, head_hash = {mark} WHERE id = {mark}",
                    [(count, last, run_id) for run_id, (count, last) in heads.items()],
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
    def _heads(conn: Connection, run_ids: set[str]) -> dict[str, tuple[int, str]]:
        rows = _select_in(conn, runs, ("id", "n_trajectories", "head_hash"), "id", list(run_ids))
        return {r[0]: (r[1], r[2]) for r in rows}

    # ---- read -------------------------------------------------------------------------
    def get(self, ids: list[str]) -> list[Trajectory]:
        """Trajectories by id, in the order asked; raises KeyError for an unknown id."""
        found: dict[str, Trajectory] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            found.update((t.id, t) for _, t in self._load(trajectories.c.id.in_(chunk)))
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
        """Like `query`, streaming in chunks of `chunk` trajectories (constant memory)."""
        conds = self._conds(run_id=run_id, kind=kind, split=split, unconsumed_by=unconsumed_by)
        after = 0
        left = limit
        while left is None or left > 0:
            n = chunk if left is None else min(chunk, left)
            page = self._load(*conds, trajectories.c.seq > after, limit=n)
            if not page:
                return
            yield from (t for _, t in page)
            after = page[-1][0]
            if left is not None:
                left -= len(page)
            if len(page) < n:
                return

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

    def _load(self, *conds: Any, limit: int | None = None) -> list[tuple[int, Trajectory]]:
        """(seq, trajectory) pairs in insertion order."""
        stmt = select(trajectories, tasks.c.body.label("task_body")).join(
            tasks, tasks.c.hash == trajectories.c.task_hash
        )
        stmt = stmt.where(*conds).order_by(trajectories.c.seq)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
            out: list[tuple[int, Trajectory]] = []
            for r in rows:
                with _reading(r["id"]):
                    traj = _trajectory(r)
                out.append((r["seq"], traj))
            by_id = {t.id: t for _, t in out}
            if by_id:
                self._attach_steps(conn, by_id)
        return out

    @staticmethod
    def _attach_steps(conn: Connection, by_id: dict[str, Trajectory]) -> None:
        ids = list(by_id)
        step_rows = conn.execute(
            select(steps).where(steps.c.trajectory_id.in_(ids)).order_by(steps.c.trajectory_id, steps.c.idx)
        ).mappings()
        for r in step_rows:
            with _reading(r["trajectory_id"], f"step {r['idx']}"):
                step = Step(
                    index=r["idx"],
                    action=json.loads(r["action"]),
                    observation=json.loads(r["observation"]),
                    reward=r["reward"],
                    info=json.loads(r["info"]),
                    error=r["error"],
                )
            by_id[r["trajectory_id"]].steps.append(step)
        trace_rows = conn.execute(
            select(token_traces)
            .where(token_traces.c.trajectory_id.in_(ids))
            .order_by(token_traces.c.trajectory_id, token_traces.c.turn)
        ).mappings()
        previous: dict[str, list[int]] = {}
        for r in trace_rows:
            tid = r["trajectory_id"]
            with _reading(tid, f"token trace {r['turn']}"):
                prev = previous.get(tid, [])
                prompt = prev[: r["prefix_len"]] + _blob_ids(r["prompt_suffix"])
                completion = _blob_ids(r["completion_ids"])
                previous[tid] = prompt + completion
                step_list = by_id[tid].steps
                if not 0 <= r["turn"] < len(step_list) or step_list[r["turn"]].index != r["turn"]:
                    continue  # a trace without its step; integrity verification reports the mismatch
                step_list[r["turn"]].trace = TokenTrace(
                    prompt_ids=prompt,
                    completion_ids=completion,
                    logprobs=None if r["logprobs"] is None else np.frombuffer(r["logprobs"], dtype="<f4").tolist(),
                    policy_version=r["policy_version"],
                    policy_versions=json.loads(r["policy_versions"]),
                    temperature=r["temperature"],
                    top_p=r["top_p"],
                    finish_reason=r["finish_reason"],
                )

    # ---- consumption and lineage -------------------------------------------------------
    def mark_consumed(self, ids: list[str], step: int, consumer: str) -> None:
        """Record that training step `step` of `consumer` used these trajectories.
        Consuming a trajectory twice in one consumer raises and records nothing."""
        now = time.time()
        with self.engine.begin() as conn:
            taken = list(
                conn.execute(
                    select(consumption.c.trajectory_id).where(
                        consumption.c.consumer == consumer, consumption.c.trajectory_id.in_(ids)
                    )
                ).scalars()
            )
            if taken:
                raise ValueError(f"{len(taken)} trajectories were already consumed by {consumer}, e.g. {taken[0]}")
            rows = [{"consumer": consumer, "trajectory_id": i, "train_step": step, "consumed_at": now} for i in ids]
            if rows:
                conn.execute(consumption.insert(), rows)

    def consumed_step(self, trajectory_id: str, consumer: str) -> int | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(consumption.c.train_step).where(
                    consumption.c.consumer == consumer, consumption.c.trajectory_id == trajectory_id
                )
            ).first()
        return None if row is None else int(row[0])

    def release_consumed_after(self, consumer: str, step: int) -> int:
        """Forget consumption by training steps after `step` (their update was lost in a crash),
        so a trainer resumed from the checkpoint of `step` gets that data again."""
        with self.engine.begin() as conn:
            result = conn.execute(
                delete(consumption).where(consumption.c.consumer == consumer, consumption.c.train_step > step)
            )
        return int(result.rowcount or 0)

    def add_checkpoint(
        self,
        run_id: str,
        version: int,
        *,
        weights_hash: str,
        train_step: int,
        parent_version: int | None = None,
        path: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        with self.engine.begin() as conn:
            exists = conn.execute(
                select(checkpoints.c.version).where(checkpoints.c.run_id == run_id, checkpoints.c.version == version)
            ).first()
            if exists is None:
                conn.execute(
                    checkpoints.insert().values(
                        run_id=run_id,
                        version=version,
                        parent_version=parent_version,
                        train_step=train_step,
                        weights_hash=weights_hash,
                        path=path,
                        created_at=time.time(),
                        meta=_dumps(meta or {}),
                    )
                )

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(checkpoints).where(checkpoints.c.run_id == run_id).order_by(checkpoints.c.version)
            ).mappings()
            return [{**r, "meta": json.loads(r["meta"])} for r in rows]

    def lineage(self, run_id: str, version: int) -> list[str]:
        """Ids of the trajectories whose training steps led to checkpoint `version`."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(checkpoints.c.train_step).where(checkpoints.c.run_id == run_id, checkpoints.c.version == version)
            ).first()
            if row is None:
                raise KeyError(f"no checkpoint v{version} in run {run_id!r}")
            stmt = select(consumption.c.trajectory_id).where(
                consumption.c.consumer == run_id, consumption.c.train_step <= row[0]
            )
            return list(conn.execute(stmt).scalars())

    # ---- judgements ---------------------------------------------------------------------
    def add_score(
        self, trajectory_id: str, judge: str, name: str, value: float, meta: dict[str, Any] | None = None
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                scores.insert().values(
                    trajectory_id=trajectory_id,
                    judge=judge,
                    name=name,
                    value=value,
                    meta=_dumps(meta or {}),
                    created_at=time.time(),
                )
            )

    def add_verdict(
        self,
        trajectory_id: str,
        *,
        judge: str,
        judge_version: str,
        unsafe: bool,
        severity: float = 0.0,
        reasons: list[str] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.add_verdicts(
            [
                {
                    "trajectory_id": trajectory_id,
                    "judge": judge,
                    "judge_version": judge_version,
                    "unsafe": unsafe,
                    "severity": severity,
                    "reasons": reasons,
                    "meta": meta,
                }
            ]
        )

    def add_verdicts(self, verdicts: list[dict[str, Any]]) -> None:
        """Attach many safety verdicts in one transaction (each: the keyword arguments of `add_verdict`)."""
        if not verdicts:
            return
        now = time.time()
        rows = [
            {
                "trajectory_id": v["trajectory_id"],
                "judge": v["judge"],
                "judge_version": v["judge_version"],
                "unsafe": bool(v["unsafe"]),
                "severity": float(v.get("severity", 0.0)),
                "reasons": _dumps(v.get("reasons") or []),
                "meta": _dumps(v.get("meta") or {}),
                "created_at": now,
            }
            for v in verdicts
        ]
        with self.engine.begin() as conn:
            conn.execute(safety_verdicts.insert(), rows)

    def add_gate_decision(self, run_id: str, decision: dict[str, Any]) -> None:
        """Record one evaluation-gate decision (candidate and baseline versions, verdict, metrics)."""
        with self.engine.begin() as conn:
            conn.execute(
                gate_decisions.insert().values(
                    run_id=run_id,
                    candidate_version=int(decision["candidate_version"]),
                    baseline_version=int(decision["baseline_version"]),
                    accepted=bool(decision["accepted"]),
                    reasons=_dumps(decision.get("reasons", [])),
                    decision=_dumps(decision),
                    created_at=time.time(),
                )
            )

    def gate_decisions(self, run_id: str) -> list[dict[str, Any]]:
        """The run's gate decisions in the order they were taken."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(gate_decisions).where(gate_decisions.c.run_id == run_id).order_by(gate_decisions.c.id)
            ).mappings()
            return [json.loads(r["decision"]) for r in rows]

    def verdicts(self, trajectory_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(safety_verdicts).where(safety_verdicts.c.trajectory_id == trajectory_id)
            ).mappings()
            return [{**r, "reasons": json.loads(r["reasons"]), "meta": json.loads(r["meta"])} for r in rows]


# The ingest path talks to the driver directly, on the connection (and so in the transaction)
# of the SQLAlchemy `Connection`: plain SQL and tuples of str, int, float, bool, bytes or
# None, which both sqlite3 and psycopg take as they are. SQLAlchemy's statement compilation
# and per-value processing would cost about as much as the database work.


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


def _trajectory(r: Any) -> Trajectory:
    """A trajectory (without its steps) from its row joined with its task's body."""
    return Trajectory.model_validate(
        {
            **json.loads(r["meta"]),
            "id": r["id"],
            "run_id": r["run_id"],
            "group_id": r["group_id"],
            "kind": r["kind"],
            "task": json.loads(r["task_body"]),
            "task_hash": r["task_hash"],
            "env_id": r["env_id"],
            "env_version": r["env_version"],
            "seed": r["seed"],
            "reward": r["reward"],
            "success": r["success"],
            "termination": r["termination"],
            "error": r["error"],
            "content_hash": r["content_hash"],
            "prev_hash": r["prev_hash"],
        }
    )


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


def _widen_text_columns(conn: Connection) -> None:
    """PostgreSQL stores made before free-text columns were TEXT: widen their VARCHAR(n) columns
    (a change of the column's type only; PostgreSQL rewrites neither rows nor indexes)."""
    rows = conn.exec_driver_sql(
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND data_type = 'character varying'"
    ).all()
    for table_name, column_name in rows:
        table = metadata.tables.get(table_name)
        if table is not None and column_name in table.c and isinstance(table.c[column_name].type, Text):
            preparer = conn.dialect.identifier_preparer
            conn.exec_driver_sql(
                f"ALTER TABLE {preparer.quote(table_name)} ALTER COLUMN {preparer.quote(column_name)} TYPE TEXT"
            )


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
