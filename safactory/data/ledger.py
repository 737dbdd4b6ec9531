"""The store's bookkeeping beside the trajectories: exactly-once consumption by training
runs, checkpoints and their lineage, scores and safety verdicts, and evaluation-gate decisions.

`StoreLedger` is a mixin of `TrajectoryStore`; it works on the store's `engine`. Every write
appends to its table's hash chain under the chain's lock (`safactory.data.seal`), with an
HMAC of the new head when the store has a key; reads leave the chain columns out.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import Column, Table, delete, func, select
from sqlalchemy.engine import Engine

from safactory.data.schema import checkpoints, consumption, gate_decisions, safety_verdicts, scores, trajectories
from safactory.data.seal import append, lock_head, relink_from


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _public(table: Table) -> list[Column]:
    """The columns readers get: all but the chain's."""
    return [c for c in table.c if c.name not in ("chain_seq", "chain_hash")]


class StoreLedger:
    """Consumption, checkpoints, lineage, judgements and gate decisions of a `TrajectoryStore`."""

    engine: Engine
    key: bytes | None  # HMAC key of the chain heads, or None

    # ---- consumption and lineage -------------------------------------------------------
    def mark_consumed(self, ids: list[str], step: int, consumer: str) -> None:
        """Record that training step `step` of `consumer` used these trajectories.
        Consuming a trajectory twice in one consumer raises and records nothing."""
        now = time.time()
        with self.engine.begin() as conn:
            head = lock_head(conn, consumption)
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
            append(conn, head, rows, self.key)

    def consumed_step(self, trajectory_id: str, consumer: str) -> int | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(consumption.c.train_step).where(
                    consumption.c.consumer == consumer, consumption.c.trajectory_id == trajectory_id
                )
            ).first()
        return None if row is None else int(row[0])

    def consumed_count(self, consumer: str, *, run_id: str | None = None, kind: str | None = None) -> int:
        """How many trajectories `consumer` has consumed (of run `run_id` and of `kind`, when given)."""
        stmt = select(func.count()).select_from(consumption).where(consumption.c.consumer == consumer)
        if run_id is not None or kind is not None:
            stmt = stmt.join(trajectories, trajectories.c.id == consumption.c.trajectory_id)
        if run_id is not None:
            stmt = stmt.where(trajectories.c.run_id == run_id)
        if kind is not None:
            stmt = stmt.where(trajectories.c.kind == kind)
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def release_consumed_after(self, consumer: str, step: int) -> int:
        """Forget consumption by training steps after `step` (their update was lost in a crash),
        so a trainer resumed from the checkpoint of `step` gets that data again. The consumption
        chain is relinked from the first released row on (usually its tail: nothing to relink)."""
        lost = (consumption.c.consumer == consumer, consumption.c.train_step > step)
        with self.engine.begin() as conn:
            head = lock_head(conn, consumption)
            first = conn.execute(select(func.min(consumption.c.chain_seq)).where(*lost)).scalar()
            if first is None:
                return 0
            result = conn.execute(delete(consumption).where(*lost))
            relink_from(conn, head, int(first), self.key)
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
            head = lock_head(conn, checkpoints)
            exists = conn.execute(
                select(checkpoints.c.version).where(checkpoints.c.run_id == run_id, checkpoints.c.version == version)
            ).first()
            if exists is None:
                row = {
                    "run_id": run_id,
                    "version": version,
                    "parent_version": parent_version,
                    "train_step": train_step,
                    "weights_hash": weights_hash,
                    "path": path,
                    "created_at": time.time(),
                    "meta": _dumps(meta or {}),
                }
                append(conn, head, [row], self.key)

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(*_public(checkpoints)).where(checkpoints.c.run_id == run_id).order_by(checkpoints.c.version)
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
        row = {
            "trajectory_id": trajectory_id,
            "judge": judge,
            "name": name,
            "value": value,
            "meta": _dumps(meta or {}),
            "created_at": time.time(),
        }
        with self.engine.begin() as conn:
            append(conn, lock_head(conn, scores), [row], self.key)

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
            append(conn, lock_head(conn, safety_verdicts), rows, self.key)

    def add_gate_decision(self, run_id: str, decision: dict[str, Any]) -> None:
        """Record one evaluation-gate decision (candidate and baseline versions, verdict, metrics)."""
        row = {
            "run_id": run_id,
            "candidate_version": int(decision["candidate_version"]),
            "baseline_version": int(decision["baseline_version"]),
            "accepted": bool(decision["accepted"]),
            "reasons": _dumps(decision.get("reasons", [])),
            "decision": _dumps(decision),
            "created_at": time.time(),
        }
        with self.engine.begin() as conn:
            append(conn, lock_head(conn, gate_decisions), [row], self.key)

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
                select(*_public(safety_verdicts))
                .where(safety_verdicts.c.trajectory_id == trajectory_id)
                .order_by(safety_verdicts.c.id)
            ).mappings()
            return [{**r, "reasons": json.loads(r["reasons"]), "meta": json.loads(r["meta"])} for r in rows]
