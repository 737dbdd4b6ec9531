"""Store ingest: trajectories/s through TrajectoryStore.add (hashing, chain, compact traces,
one transaction per batch) vs raw sqlite3.executemany of the very same rows, same run.

Run: `python benchmarks/store_ingest.py [--n 2000] [--batch 100] [--postgres]`. Both sides
use the same SQLite file settings (WAL, synchronous=FULL) and batch size; the raw side
gets its rows precomputed, so it measures only what the database itself costs. With
--postgres it also reports our throughput on a throwaway PostgreSQL server started from
the machine's binaries. Last line: `ratio=<ours/raw>` (target >= 0.5).
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from safactory.data.store import TrajectoryStore
from safactory.data.synthetic import synthetic_trajectory


def make(n: int, run_id: str) -> list:
    rng = random.Random(0)
    return [synthetic_trajectory(run_id, rng) for _ in range(n)]


def ours(url: str, trajs: list, batch: int) -> float:
    store = TrajectoryStore(url)
    store.create_run("bench", {})
    start = time.perf_counter()
    for i in range(0, len(trajs), batch):
        store.add(trajs[i : i + batch])
    elapsed = time.perf_counter() - start
    store.close()
    return len(trajs) / elapsed


def raw(path: Path, trajs: list, batch: int) -> float:
    """The same rows our store writes, inserted with plain sqlite3."""
    TrajectoryStore(f"sqlite:///{path}").close()  # create identical tables
    rows = []
    for t in trajs:
        t.task_hash = t.task.hash()
        t.content_hash = t.compute_hash()
        rows.append(
            (
                TrajectoryStore._traj_row(t),
                [TrajectoryStore._step_row(t.id, s) for s in t.steps],
                TrajectoryStore._trace_rows(t),
                TrajectoryStore._task_row(t.task),
            )
        )
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")

    def insert(table: str, items: list[dict]) -> None:
        if items:
            cols = list(items[0])
            sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            conn.executemany(sql, [tuple(r[c] for c in cols) for r in items])

    seen: set[str] = set()
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        with conn:
            fresh = {r[3]["hash"]: r[3] for r in chunk if r[3]["hash"] not in seen}
            seen.update(fresh)
            insert("tasks", list(fresh.values()))
            insert("trajectories", [r[0] for r in chunk])
            insert("steps", [s for r in chunk for s in r[1]])
            insert("token_traces", [s for r in chunk for s in r[2]])
    elapsed = time.perf_counter() - start
    conn.close()
    return len(trajs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours_rate = ours(f"sqlite:///{Path(tmp) / 'ours.db'}", make(args.n, "bench"), args.batch)
        raw_rate = raw(Path(tmp) / "raw.db", make(args.n, "bench"), args.batch)
    print(f"sqlite: ours {ours_rate:,.0f} trajectories/s, raw executemany {raw_rate:,.0f} trajectories/s")
    if args.postgres:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.pg_server import PostgresServer, find_bindir

        bindir = find_bindir()
        if bindir is None:
            print("postgresql: skipped (no binaries)")
        else:
            server = PostgresServer(bindir)
            server.start()
            try:
                pg_rate = ours(server.create_database("bench"), make(args.n, "bench"), args.batch)
                print(f"postgresql: ours {pg_rate:,.0f} trajectories/s")
            finally:
                server.stop()
    print(f"ratio={ours_rate / raw_rate:.3f}")


if __name__ == "__main__":
    main()
