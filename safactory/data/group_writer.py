"""Writing groups from another process: what a rollout worker (a Ray actor on any node) stores through.

`StoreTarget` is plain data (a store URL and whether to redact) that travels to the worker;
calling it there opens a `GroupWriter` on that store: `put` a finished group through a
`StoreWriter` (batched with the worker's other groups, durable when it returns, ids already
stored skipped) and ask which members of a group are `stored` already (so a retried group whose
first worker committed before it died is not played again). Workers on several nodes need a
store they all reach: PostgreSQL (a SQLite file serves only the workers of one machine).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy import select

from safactory.data.redact import Redactor
from safactory.data.schema import trajectories
from safactory.data.store import TrajectoryStore
from safactory.data.writer import StoreWriter
from safactory.types import Trajectory


class GroupWriter:
    """A worker's connection to the store: group puts and the stored-group check."""

    def __init__(self, store: TrajectoryStore) -> None:
        self.store = store
        self.writer = StoreWriter(store)

    async def put(self, group: list[Trajectory]) -> None:
        await self.writer.put(group)

    async def stored(self, group_id: str) -> list[str]:
        return await asyncio.to_thread(self._stored, group_id)

    def _stored(self, group_id: str) -> list[str]:
        stmt = select(trajectories.c.id).where(trajectories.c.group_id == group_id).order_by(trajectories.c.seq)
        with self.store.engine.connect() as conn:
            return list(conn.execute(stmt).scalars())

    async def close(self) -> None:
        try:
            await self.writer.close()
        finally:
            self.store.close()


@dataclass(frozen=True)
class StoreTarget:
    """The store a worker writes to: its URL, and whether trajectories are redacted first."""

    url: str
    redact: bool = True

    def __call__(self) -> GroupWriter:
        return GroupWriter(TrajectoryStore(self.url, redactor=Redactor() if self.redact else None))
