"""Crash safety and the ingest buffer."""

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from safactory.data.integrity import verify
from safactory.data.store import TrajectoryStore
from safactory.data.writer import StoreWriter
from tests.synthetic import synthetic_trajectory as synthetic

ROOT = Path(__file__).resolve().parents[1]


def test_kill_9_mid_ingest_loses_no_acknowledged_trajectory(store_url):
    acked: list[str] = []
    for attempt in range(2):  # crash, then a second writer appends to the same run and is crashed too
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.store_writer", store_url, "run-k", "100000"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(5 + 3 * attempt):
            line = proc.stdout.readline()
            assert line.startswith("ack "), line
            acked += line.split()[1:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

        store = TrajectoryStore(store_url)
        stored = [t.id for t in store.query(run_id="run-k")]
        assert len(stored) == len(set(stored))
        assert set(acked) <= set(stored)
        report = verify(store)
        assert report.ok, report.problems
        store.close()


def test_writer_batches_acknowledges_and_flushes(tmp_path):
    import random

    store = TrajectoryStore.in_dir(tmp_path)
    store.create_run("w", {})
    rng = random.Random(0)
    trajs = [synthetic("w", rng) for _ in range(60)]

    async def go():
        writer = StoreWriter(store, max_batch=16, max_pending=20)
        await asyncio.gather(*(writer.put(trajs[i : i + 5]) for i in range(0, 60, 5)))
        assert store.count(run_id="w") == 60  # every put returned only after its commit
        await writer.put(trajs[:5])  # idempotent
        await writer.close()
        with pytest.raises(RuntimeError, match="closed"):
            await writer.put(trajs[:1])
        return writer

    writer = asyncio.run(go())
    assert store.count(run_id="w") == 60 and writer.committed == 65
    assert [t.id for t in store.query(run_id="w")][:5] == [t.id for t in trajs[:5]]
    assert verify(store).ok


def test_a_failed_commit_fails_only_its_own_puts(tmp_path):
    import random

    store = TrajectoryStore.in_dir(tmp_path)
    store.create_run("w", {})
    rng = random.Random(1)
    good = [synthetic("w", rng) for _ in range(3)]
    bad = [synthetic("nope", rng)]  # run does not exist

    async def go():
        writer = StoreWriter(store)
        with pytest.raises(KeyError):
            await writer.put(bad)
        await writer.put(good)
        await writer.close()

    asyncio.run(go())
    assert store.count(run_id="w") == 3


def test_a_refused_put_does_not_take_its_batch_down_with_it(tmp_path):
    """Puts that share one commit: the store refuses one (NaN reward); the others are still stored."""
    import random

    store = TrajectoryStore.in_dir(tmp_path)
    store.create_run("w", {})
    rng = random.Random(2)
    first, second = [synthetic("w", rng) for _ in range(3)], [synthetic("w", rng) for _ in range(2)]
    bad = synthetic("w", rng)
    bad.reward = float("nan")

    async def go():
        writer = StoreWriter(store)
        results = await asyncio.gather(writer.put(first), writer.put([bad]), writer.put(second), return_exceptions=True)
        await writer.close()
        return results, writer

    (ok1, refused, ok2), writer = asyncio.run(go())
    assert ok1 is None and ok2 is None and isinstance(refused, ValueError) and "reward" in str(refused)
    assert {t.id for t in store.query(run_id="w")} == {t.id for t in first + second}
    assert writer.committed == 5 and verify(store).ok
