"""StoreWriter: a bounded, batching ingest buffer between the runner and the store.

`await writer.put(trajectories)` returns once they are committed (acknowledged =
durable). Puts that arrive while a commit runs are batched into the next
transaction. The buffer is bounded: when `max_pending` trajectories wait, `put`
waits too (back-pressure instead of unbounded memory). `close()` flushes what is
left. When a batch's commit fails, each of its puts is committed again on its own
(adding is idempotent), so a put whose data the store refuses fails alone and the
others sharing its batch are still stored.
"""

from __future__ import annotations

import asyncio

from safactory.data.store import TrajectoryStore
from safactory.types import Trajectory


class StoreWriter:
    def __init__(self, store: TrajectoryStore, *, max_batch: int = 512, max_pending: int = 8192) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._queue: list[tuple[list[Trajectory], asyncio.Future[None]]] = []
        self._pending = 0
        self._space = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.committed = 0

    async def put(self, trajectories: list[Trajectory]) -> None:
        """Queue trajectories and return once they are durable (ids already stored are skipped)."""
        if self._closed:
            raise RuntimeError("StoreWriter is closed")
        async with self._space:
            await self._space.wait_for(lambda: self._pending < self.max_pending)
            self._pending += len(trajectories)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((list(trajectories), future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        await future

    async def _drain(self) -> None:
        while self._queue:
            batch: list[tuple[list[Trajectory], asyncio.Future[None]]] = []
            size = 0
            while self._queue and (not batch or size + len(self._queue[0][0]) <= self.max_batch):
                item = self._queue.pop(0)
                batch.append(item)
                size += len(item[0])
            flat = [t for items, _ in batch for t in items]
            try:
                await asyncio.to_thread(self.store.add, flat)
            except Exception as exc:
                if len(batch) == 1:
                    self._settle(batch[0][1], exc)
                else:  # find the put at fault: commit each on its own
                    for items, future in batch:
                        try:
                            await asyncio.to_thread(self.store.add, items)
                        except Exception as own:
                            self._settle(future, own)
                        else:
                            self.committed += len(items)
                            self._settle(future, None)
            else:
                self.committed += len(flat)
                for _, future in batch:
                    self._settle(future, None)
            async with self._space:
                self._pending -= size
                self._space.notify_all()

    @staticmethod
    def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
        if future.done():  # the caller gave up waiting
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    async def close(self) -> None:
        """Flush everything queued, then refuse new puts."""
        self._closed = True
        if self._task is not None:
            await self._task
        while self._queue:  # puts that raced with the end of the last drain
            self._task = asyncio.create_task(self._drain())
            await self._task
