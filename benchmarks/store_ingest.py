"""Store ingest: trajectories/s through TrajectoryStore.add (hashing, chain, compact traces,
one transaction per batch) vs raw sqlite3.executemany of the very same rows, same run.

Run: `python benchmarks/store_ingest.py [--n 2000] [--batch 100] [--rounds 5] [--postgres]`.
Both sides use the same SQLite file settings (WAL, synchronous=FULL) and batch size; the raw
side gets its rows precomputed (built by the store's own row code, outside its timing), so
it measures only what the database itself costs. The two sides run in alternating rounds
on fresh files (fsync times on a shared machine vary a lot from run to run); the figures
are medians, the ratio the median of the per-round ratios. With --postgres it also reports
our throughput on a throwaway PostgreSQL server started from the machine's binaries.
Last line: `ratio=<ours/raw>` (target >= 0.5).
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' synthetic trajectories

from safactory.data.rows import TaskHashes, _rows, _task_rows
from safactory.data.schema import STEP_COLUMNS, TASK_COLUMNS, TRACE_COLUMNS, TRAJECTORY_COLUMNS
from safactory.data.store import TrajectoryStore
from tests.synthetic import synthetic_trajectory


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
    """The same rows our store writes (built by the store's own row code), inserted with plain sqlite3."""
    TrajectoryStore(f"sqlite:///{path}").close()  # create identical tables
    rows = []
    prev = ""
    for t in trajs:
        task_rows = _task_rows([t], TaskHashes())
        traj_rows, step_rows, trace_rows = [], [], []
        _rows(t, prev, time.time(), traj_rows, step_rows, trace_rows)
        prev = t.content_hash
        rows.append((traj_rows[0], step_rows, trace_rows, next(iter(task_rows.values()))))
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")

    def insert(table: str, cols: tuple[str, ...], items: list[tuple]) -> None:
        if items:
            sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            conn.executemany(sql, items)

    seen: set[str] = set()
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        with conn:
            fresh = {r[3][0]: r[3] for r in chunk if r[3][0] not in seen}
            seen.update(fresh)
            insert("tasks", TASK_COLUMNS, list(fresh.values()))
            insert("trajectories", TRAJECTORY_COLUMNS, [r[0] for r in chunk])
            insert("steps", STEP_COLUMNS, [s for r in chunk for s in r[1]])
            insert("token_traces", TRACE_COLUMNS, [s for r in chunk for s in r[2]])
    elapsed = time.perf_counter() - start
    conn.close()
    return len(trajs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of both sides; medians reported")
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    ours_rates, raw_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # alternate which side goes first, each on fresh files
            sides = [("ours", ours_rates), ("raw", raw_rates)]
            for side, rates in sides if r % 2 == 0 else sides[::-1]:
                trajs = make(args.n, "bench")
                if side == "ours":
                    rates.append(ours(f"sqlite:///{Path(tmp) / f'ours{r}.db'}", trajs, args.batch))
                else:
                    rates.append(raw(Path(tmp) / f"raw{r}.db", trajs, args.batch))
    ratios = [o / w for o, w in zip(ours_rates, raw_rates, strict=True)]
    print(
        f"sqlite: ours {median(ours_rates):,.0f} trajectories/s, raw executemany {median(raw_rates):,.0f} "
        f"trajectories/s (medians of {args.rounds} rounds; per-round ratios {', '.join(f'{x:.3f}' for x in ratios)})"
    )
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
                pg = [
                    ours(server.create_database(f"bench{r}"), make(args.n, "bench"), args.batch)
                    for r in range(args.rounds)
                ]
                print(f"postgresql: ours {median(pg):,.0f} trajectories/s (median of {args.rounds} rounds)")
            finally:
                server.stop()
    print(f"ratio={median(ratios):.3f}")


if __name__ == "__main__":
    main()
