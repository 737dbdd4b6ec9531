"""TrajectoryStore: every trajectory, its token traces and its integrity hash, on SQLAlchemy.

SQLite (WAL mode) is the embedded default; any SQLAlchemy URL works. Token traces
are stored compactly as little-endian int32 / float32 blobs, and each turn stores
only the prompt tokens that are new since the previous turn (`prefix_len` says how
many it shares), so storage grows linearly with the number of steps.

Ingest is idempotent (a trajectory id already stored is skipped) and each
trajectory gets a sha256 content hash and the hash of the run's previous
trajectory (a per-run hash chain). Consumption by the trainer is recorded with the
training step that used the data, so it is delivered exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine

from safactory.types import SCHEMA_VERSION, TokenTrace, Trajectory, canonical_json, sha256_hex

metadata = MetaData()

meta_table = Table("safactory_meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text))

runs = Table(
    "runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("config", Text, nullable=False),
    Column("config_hash", String(64), nullable=False),
)

trajectories = Table(
    "trajectories",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(36), unique=True, nullable=False),
    Column("run_id", String(64), index=True, nullable=False),
    Column("kind", String(32), index=True, nullable=False),
    Column("group_id", String(36), index=True, nullable=False),
    Column("task_id", String(256), nullable=False),
    Column("task_hash", String(64), nullable=False),
    Column("split", String(32), nullable=False),
    Column("env_id", String(128), nullable=False),
    Column("env_version", String(32), nullable=False),
    Column("policy_version", Integer, nullable=True),
    Column("n_steps", Integer, nullable=False),
    Column("reward", Float, nullable=False),
    Column("success", Boolean, nullable=False),
    Column("termination", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("consumed_step", Integer, nullable=True, index=True),
    Column("body", Text, nullable=False),
)

token_traces = Table(
    "token_traces",
    metadata,
    Column("trajectory_id", String(36), ForeignKey("trajectories.id"), primary_key=True),
    Column("turn", Integer, primary_key=True),
    Column("policy_version", Integer, nullable=False),
    Column("temperature", Float, nullable=False),
    Column("top_p", Float, nullable=False),
    Column("finish_reason", String(32), nullable=False),
    Column("prefix_len", Integer, nullable=False),
    Column("prompt_suffix", LargeBinary, nullable=False),
    Column("completion_ids", LargeBinary, nullable=False),
    Column("logprobs", LargeBinary, nullable=True),
)


def _ids_blob(ids: list[int]) -> bytes:
    return np.asarray(ids, dtype="<i4").tobytes()


def _blob_ids(blob: bytes) -> list[int]:
    return np.frombuffer(blob, dtype="<i4").astype(np.int64).tolist()


def _shared_prefix(previous: list[int], prompt: list[int]) -> int:
    n = min(len(previous), len(prompt))
    if n == 0:
        return 0
    a = np.asarray(previous[:n])
    b = np.asarray(prompt[:n])
    diff = np.nonzero(a != b)[0]
    return int(diff[0]) if len(diff) else n


class TrajectoryStore:
    """Durable, append-only trajectory storage."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        self._check_schema()

    @classmethod
    def in_dir(cls, directory: str | Path) -> TrajectoryStore:
        return cls(f"sqlite:///{Path(directory).resolve() / 'store.db'}")

    def _check_schema(self) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(select(meta_table.c.value).where(meta_table.c.key == "schema_version")).first()
            if row is None:
                conn.execute(meta_table.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.url} holds store schema {row[0]}, this safactory speaks {SCHEMA_VERSION}; "
                    "migrate it or use a new store"
                )

    def close(self) -> None:
        self.engine.dispose()

    # ---- runs -------------------------------------------------------------------------
    def create_run(self, run_id: str, config: dict[str, Any]) -> None:
        text = canonical_json(config)
        with self.engine.begin() as conn:
            exists = conn.execute(select(runs.c.id).where(runs.c.id == run_id)).first()
            if exists is None:
                conn.execute(
                    runs.insert().values(id=run_id, created_at=time.time(), config=text, config_hash=sha256_hex(text))
                )

    # ---- ingest -----------------------------------------------------------------------
    def add(self, items: Iterable[Trajectory]) -> int:
        """Store trajectories (hash, chain, traces) in one transaction; returns how many were new."""
        batch = list(items)
        if not batch:
            return 0
        with self.engine.begin() as conn:
            ids = [t.id for t in batch]
            known = set(conn.execute(select(trajectories.c.id).where(trajectories.c.id.in_(ids))).scalars())
            last_hash: dict[str, str] = {}
            traj_rows: list[dict[str, Any]] = []
            trace_rows: list[dict[str, Any]] = []
            for traj in batch:
                if traj.id in known:
                    continue
                known.add(traj.id)
                if traj.run_id not in last_hash:
                    last_hash[traj.run_id] = self._last_hash(conn, traj.run_id)
                traj.content_hash = traj.compute_hash()
                traj.prev_hash = last_hash[traj.run_id]
                last_hash[traj.run_id] = traj.content_hash
                traj_rows.append(self._row(traj))
                trace_rows += self._trace_rows(traj)
            if traj_rows:
                conn.execute(trajectories.insert(), traj_rows)
            if trace_rows:
                conn.execute(token_traces.insert(), trace_rows)
        return len(traj_rows)

    @staticmethod
    def _last_hash(conn: Any, run_id: str) -> str:
        row = conn.execute(
            select(trajectories.c.content_hash)
            .where(trajectories.c.run_id == run_id)
            .order_by(trajectories.c.seq.desc())
            .limit(1)
        ).first()
        return row[0] if row else ""

    @staticmethod
    def _row(traj: Trajectory) -> dict[str, Any]:
        body = traj.model_dump(mode="json", exclude={"content_hash", "prev_hash"})
        for step in body["steps"]:
            step["trace"] = None
        versions = traj.policy_versions()
        return {
            "id": traj.id,
            "run_id": traj.run_id,
            "kind": traj.kind,
            "group_id": traj.group_id,
            "task_id": traj.task.id,
            "task_hash": traj.task_hash,
            "split": traj.task.split,
            "env_id": traj.env_id,
            "env_version": traj.env_version,
            "policy_version": max(versions) if versions else None,
            "n_steps": len(traj.steps),
            "reward": traj.reward,
            "success": traj.success,
            "termination": traj.termination,
            "created_at": time.time(),
            "content_hash": traj.content_hash,
            "prev_hash": traj.prev_hash,
            "body": json.dumps(body, separators=(",", ":")),
        }

    @staticmethod
    def _trace_rows(traj: Trajectory) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        previous: list[int] = []
        for step in traj.steps:
            tr = step.trace
            if tr is None:
                continue
            prefix = _shared_prefix(previous, tr.prompt_ids)
            rows.append(
                {
                    "trajectory_id": traj.id,
                    "turn": step.index,
                    "policy_version": tr.policy_version,
                    "temperature": tr.temperature,
                    "top_p": tr.top_p,
                    "finish_reason": tr.finish_reason,
                    "prefix_len": prefix,
                    "prompt_suffix": _ids_blob(tr.prompt_ids[prefix:]),
                    "completion_ids": _ids_blob(tr.completion_ids),
                    "logprobs": None if tr.logprobs is None else np.asarray(tr.logprobs, dtype="<f4").tobytes(),
                }
            )
            previous = tr.prompt_ids + tr.completion_ids
        return rows

    # ---- read -------------------------------------------------------------------------
    def get(self, ids: list[str]) -> list[Trajectory]:
        """Trajectories by id, in the order asked; raises KeyError for an unknown id."""
        found = {t.id: t for t in self._load(trajectories.c.id.in_(ids))} if ids else {}
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"trajectories not in store: {missing[:5]}")
        return [found[i] for i in ids]

    def query(
        self, *, run_id: str | None = None, kind: str | None = None, unconsumed: bool = False, limit: int | None = None
    ) -> list[Trajectory]:
        """Trajectories in insertion order, filtered."""
        conds = []
        if run_id is not None:
            conds.append(trajectories.c.run_id == run_id)
        if kind is not None:
            conds.append(trajectories.c.kind == kind)
        if unconsumed:
            conds.append(trajectories.c.consumed_step.is_(None))
        return self._load(*conds, limit=limit)

    def count(self, *, run_id: str | None = None, kind: str | None = None) -> int:
        stmt = select(func.count()).select_from(trajectories)
        if run_id is not None:
            stmt = stmt.where(trajectories.c.run_id == run_id)
        if kind is not None:
            stmt = stmt.where(trajectories.c.kind == kind)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def _load(self, *conds: Any, limit: int | None = None) -> list[Trajectory]:
        stmt = select(trajectories.c.body, trajectories.c.id, trajectories.c.content_hash, trajectories.c.prev_hash)
        stmt = stmt.where(*conds).order_by(trajectories.c.seq)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
            out = []
            for body, _id, content_hash, prev_hash in rows:
                traj = Trajectory.model_validate_json(body)
                traj.content_hash, traj.prev_hash = content_hash, prev_hash
                out.append(traj)
            by_id = {t.id: t for t in out}
            for chunk_start in range(0, len(out), 500):
                chunk = [t.id for t in out[chunk_start : chunk_start + 500]]
                trace_stmt = select(token_traces).where(token_traces.c.trajectory_id.in_(chunk))
                trace_stmt = trace_stmt.order_by(token_traces.c.trajectory_id, token_traces.c.turn)
                previous: dict[str, list[int]] = {}
                for r in conn.execute(trace_stmt).mappings():
                    prev = previous.get(r["trajectory_id"], [])
                    prompt = prev[: r["prefix_len"]] + _blob_ids(r["prompt_suffix"])
                    completion = _blob_ids(r["completion_ids"])
                    logprobs = None if r["logprobs"] is None else np.frombuffer(r["logprobs"], dtype="<f4").tolist()
                    previous[r["trajectory_id"]] = prompt + completion
                    by_id[r["trajectory_id"]].steps[r["turn"]].trace = TokenTrace(
                        prompt_ids=prompt,
                        completion_ids=completion,
                        logprobs=logprobs,
                        policy_version=r["policy_version"],
                        temperature=r["temperature"],
                        top_p=r["top_p"],
                        finish_reason=r["finish_reason"],
                    )
        return out

    # ---- consumption ------------------------------------------------------------------
    def mark_consumed(self, ids: list[str], step: int) -> None:
        """Record that training step `step` used these trajectories."""
        with self.engine.begin() as conn:
            conn.execute(update(trajectories).where(trajectories.c.id.in_(ids)).values(consumed_step=step))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
