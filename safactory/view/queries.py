"""The view's reads of the store: pages of trajectories (keyset pagination in SQL), one trajectory
with its verdicts, scores, integrity and lineage, and the runs with their versions and gate decisions.

Pages are keyset pages on `seq` (the insertion order): newest first, a page after a cursor is
`seq < cursor ORDER BY seq DESC LIMIT n`. Within a run they go through the `(run_id, kind, seq)`
index: one ordered, limited lookup per kind the run holds (its kinds found by a loose index scan,
one index probe each), merged. So a page's cost does not grow with the store, and no read loads
more rows than a page holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, union_all
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select

from safactory.data.schema import checkpoints, consumption, runs, safety_verdicts, scores, trajectories
from safactory.data.store import CorruptRecordError, TrajectoryStore
from safactory.data.verdicts import SafetyVerdict, combine_status, stored_verdicts
from safactory.types import Trajectory
from safactory.view.filters import TrajectoryFilter

MAX_PAGE = 200
ROW_COLUMNS = (
    "seq",
    "id",
    "run_id",
    "kind",
    "env_id",
    "task_id",
    "split",
    "policy_version",
    "n_steps",
    "reward",
    "success",
    "termination",
    "error",
    "created_at",
    "meta",
)


@dataclass
class Page:
    """One page of trajectory rows, newest first, with the cursors of its neighbours (None at an end)."""

    rows: list[dict[str, Any]]
    older: int | None  # `before=` of the next (older) page
    newer: int | None  # `after=` of the previous (newer) page


@dataclass
class Detail:
    """One trajectory as the trajectory page shows it."""

    trajectory: Trajectory | None
    row: dict[str, Any]
    problem: str | None  # why its rows do not match its content hash, or None (verified)
    chain: str  # "linked", "first of its run" or what is wrong with its link
    verdicts: list[SafetyVerdict] = field(default_factory=list)
    status: str | None = None
    scores: list[dict[str, Any]] = field(default_factory=list)
    consumed: list[dict[str, Any]] = field(default_factory=list)  # {consumer, train_step, versions}


class StoreReader:
    """Read-only queries of the view over one `TrajectoryStore`."""

    def __init__(self, store: TrajectoryStore) -> None:
        self.store = store
        self.dialect = store.engine.dialect.name

    # ---- pages of trajectories ----------------------------------------------------------------
    def page(
        self, filt: TrajectoryFilter, *, before: int | None = None, after: int | None = None, limit: int = 50
    ) -> Page:
        """The page after cursor `before` (older rows) or before cursor `after` (newer rows), or the newest."""
        limit = max(1, min(limit, MAX_PAGE))
        newest_first = after is None
        with self.store.engine.connect() as conn:
            seqs = self._seqs(conn, filt, before, after, limit + 1, newest_first)
            more = len(seqs) > limit
            seqs = seqs[:limit]
            if not newest_first:
                seqs.reverse()
            rows = self._rows(conn, seqs)
        if newest_first:
            older = seqs[-1] if more and seqs else None
            newer = seqs[0] if before is not None and seqs else None
        else:
            older = seqs[-1] if seqs else None
            newer = seqs[0] if more and seqs else None
        return Page(rows, older, newer)

    def _seqs(
        self,
        conn: Connection,
        filt: TrajectoryFilter,
        before: int | None,
        after: int | None,
        n: int,
        newest_first: bool,
    ) -> list[int]:
        t = trajectories.c
        conds = filt.conditions(self.dialect)
        if before is not None:
            conds.append(t.seq < before)
        if after is not None:
            conds.append(t.seq > after)
        order = t.seq.desc() if newest_first else t.seq.asc()
        run, kind = filt.run, filt.kind
        if run is None:
            stmt: Select[Any] = select(t.seq).where(*conds)
            if kind is not None:
                stmt = stmt.where(t.kind == kind)
            return list(conn.execute(stmt.order_by(order).limit(n)).scalars())
        kinds = [kind] if kind is not None else self.run_kinds(conn, run)
        if not kinds:
            return []
        parts = [
            select(t.seq).where(t.run_id == run, t.kind == k, *conds).order_by(order).limit(n).subquery().select()
            for k in kinds
        ]
        merged = _merge(parts)
        ordered = merged.c.seq.desc() if newest_first else merged.c.seq.asc()
        return list(conn.execute(select(merged.c.seq).order_by(ordered).limit(n)).scalars())

    @staticmethod
    def run_kinds(conn: Connection, run_id: str) -> list[str]:
        """The kinds of a run's trajectories: a loose scan of the `(run_id, kind, seq)` index, one probe per kind."""
        t = trajectories.c
        kinds: list[str] = []
        while True:
            stmt = select(func.min(t.kind)).where(t.run_id == run_id)
            if kinds:
                stmt = stmt.where(t.kind > kinds[-1])
            kind = conn.execute(stmt).scalar()
            if kind is None:
                return kinds
            kinds.append(kind)

    def _rows(self, conn: Connection, seqs: list[int]) -> list[dict[str, Any]]:
        """The listed rows, in the order of `seqs`, each with its combined verdict status and tags."""
        if not seqs:
            return []
        cols = [trajectories.c[name] for name in ROW_COLUMNS]
        found = {r["seq"]: dict(r) for r in conn.execute(select(*cols).where(trajectories.c.seq.in_(seqs))).mappings()}
        rows = [found[s] for s in seqs if s in found]
        v = safety_verdicts.c
        ids = [r["id"] for r in rows]
        verdicts: dict[str, list[dict[str, Any]]] = {}
        stmt = select(v.trajectory_id, v.judge, v.judge_version, v.unsafe, v.meta).where(v.trajectory_id.in_(ids))
        for r in conn.execute(stmt).mappings():
            verdicts.setdefault(r["trajectory_id"], []).append({**r, "meta": json.loads(r["meta"])})
        for row in rows:
            meta = json.loads(row.pop("meta"))
            row["tags"] = meta.get("tags") or {}
            row["status"] = combine_status(verdicts.get(row["id"], []))
        return rows

    # ---- one trajectory -----------------------------------------------------------------------
    def detail(self, trajectory_id: str) -> Detail | None:
        """The trajectory, checked against its rows, with everything its page shows; None if unknown."""
        t = trajectories.c
        with self.store.engine.connect() as conn:
            row = (
                conn.execute(
                    select(*[t[c] for c in (*ROW_COLUMNS, "prev_hash", "content_hash")]).where(t.id == trajectory_id)
                )
                .mappings()
                .first()
            )
            if row is None:
                return None
            row = dict(row)
            row["tags"] = json.loads(row.pop("meta")).get("tags") or {}
            chain = self._chain(conn, row)
            consumed = self._consumed(conn, trajectory_id)
            score_rows = [
                {**r, "meta": json.loads(r["meta"])}
                for r in conn.execute(
                    select(scores.c.judge, scores.c.name, scores.c.value, scores.c.meta)
                    .where(scores.c.trajectory_id == trajectory_id)
                    .order_by(scores.c.id)
                ).mappings()
            ]
        traj: Trajectory | None = None
        problem: str | None = None
        try:
            traj = self.store.get([trajectory_id])[0]
        except CorruptRecordError as exc:
            problem = str(exc)
        verdicts = stored_verdicts(self.store, trajectory_id)
        return Detail(
            trajectory=traj,
            row=row,
            problem=problem,
            chain=chain,
            verdicts=verdicts,
            status=combine_status(verdicts),
            scores=score_rows,
            consumed=consumed,
        )

    def _chain(self, conn: Connection, row: dict[str, Any]) -> str:
        """Whether the trajectory's `prev_hash` is the content hash of the one stored before it in its run."""
        t = trajectories.c
        kinds = self.run_kinds(conn, row["run_id"])
        parts = [
            select(t.seq, t.content_hash)
            .where(t.run_id == row["run_id"], t.kind == k, t.seq < row["seq"])
            .order_by(t.seq.desc())
            .limit(1)
            .subquery()
            .select()
            for k in kinds
        ]
        merged = _merge(parts)
        previous = conn.execute(select(merged.c.content_hash).order_by(merged.c.seq.desc()).limit(1)).scalar()
        if previous is None:
            return "first of its run" if row["prev_hash"] == "" else "its previous hash names no stored trajectory"
        if previous == row["prev_hash"]:
            return "linked"
        return f"broken: its previous hash {row['prev_hash'][:12]} is not {previous[:12]} (the one stored before it)"

    @staticmethod
    def _consumed(conn: Connection, trajectory_id: str) -> list[dict[str, Any]]:
        """Which training steps used the trajectory and the versions that came of them (lineage):
        each consumer found by a loose scan of the consumption key, then one key lookup each."""
        c = consumption.c
        out: list[dict[str, Any]] = []
        last: str | None = None
        while True:
            stmt = select(func.min(c.consumer))
            if last is not None:
                stmt = stmt.where(c.consumer > last)
            consumer = conn.execute(stmt).scalar()
            if consumer is None:
                return out
            last = consumer
            step = conn.execute(
                select(c.train_step).where(c.consumer == consumer, c.trajectory_id == trajectory_id)
            ).scalar()
            if step is None:
                continue
            versions = list(
                conn.execute(
                    select(checkpoints.c.version)
                    .where(checkpoints.c.run_id == consumer, checkpoints.c.train_step >= step)
                    .order_by(checkpoints.c.version)
                ).scalars()
            )
            out.append({"consumer": consumer, "train_step": step, "versions": versions})

    # ---- runs ---------------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        """The store's runs (newest first): id, created_at, config, n_trajectories."""
        r = runs.c
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                select(r.id, r.created_at, r.config, r.n_trajectories).order_by(r.created_at.desc())
            ).mappings()
            return [{**row, "config": json.loads(row["config"])} for row in rows]

    def run(self, run_id: str) -> dict[str, Any] | None:
        r = runs.c
        with self.store.engine.connect() as conn:
            row = (
                conn.execute(select(r.id, r.created_at, r.config, r.n_trajectories).where(r.id == run_id))
                .mappings()
                .first()
            )
        return None if row is None else {**row, "config": json.loads(row["config"])}

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        return self.store.checkpoints(run_id)

    def gate_decisions(self, run_id: str) -> list[dict[str, Any]]:
        return self.store.gate_decisions(run_id)

    def kinds(self, run_id: str) -> list[str]:
        with self.store.engine.connect() as conn:
            return self.run_kinds(conn, run_id)

    def eval_versions(self, run_id: str) -> list[int]:
        """The policy versions of the run's held-out evaluation episodes (kind `eval`)."""
        t = trajectories.c
        stmt = (
            select(t.policy_version)
            .where(t.run_id == run_id, t.kind == "eval", t.policy_version.is_not(None))
            .distinct()
            .order_by(t.policy_version)
        )
        with self.store.engine.connect() as conn:
            return list(conn.execute(stmt).scalars())

    def eval_episodes(self, run_id: str, version: int) -> list[Trajectory]:
        """The run's held-out evaluation episodes of one policy version."""
        t = trajectories.c
        stmt = select(t.id).where(t.run_id == run_id, t.kind == "eval", t.policy_version == version).order_by(t.seq)
        with self.store.engine.connect() as conn:
            ids = list(conn.execute(stmt).scalars())
        return self.store.get(ids)

    def statuses(self, ids: list[str]) -> dict[str, str | None]:
        """The combined verdict status of each trajectory (None: unjudged)."""
        v = safety_verdicts.c
        found: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        with self.store.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                stmt = select(v.trajectory_id, v.judge, v.judge_version, v.unsafe, v.meta).where(
                    v.trajectory_id.in_(ids[start : start + 500])
                )
                for r in conn.execute(stmt).mappings():
                    found[r["trajectory_id"]].append({**r, "meta": json.loads(r["meta"])})
        return {i: combine_status(rows) for i, rows in found.items()}


def _merge(parts: list[Select[Any]]) -> Any:
    """The rows of the limited lookups together, as one subquery."""
    return parts[0].subquery() if len(parts) == 1 else union_all(*parts).subquery()
