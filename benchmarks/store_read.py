"""Store reads: trajectories/s through TrajectoryStore.iter with its row check (each trajectory's
rows against its n_steps, derived columns and content hash, `safactory.data.rows.row_problem`)
vs the same reads with the check switched off, same run, same store.

Run: `python benchmarks/store_read.py [--n 2000] [--turns 4] [--rounds 7] [--postgres]`.
The two sides alternate over the same SQLite (or PostgreSQL) store; figures are medians, the
ratio the median of the per-round ratios. Last line: `ratio=<checked/unchecked>` (target >= 0.9).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' synthetic trajectories

import safactory.data.store as store_module
from safactory.data.store import TrajectoryStore
from tests.synthetic import synthetic_trajectory


def fill(url: str, n: int, turns: int) -> TrajectoryStore:
    store = TrajectoryStore(url)
    store.create_run("bench", {})
    rng = random.Random(0)
    trajs = [synthetic_trajectory("bench", rng, turns=turns, tokens_per_turn=40) for _ in range(n)]
    for i in range(0, n, 200):
        store.add(trajs[i : i + 200])
    return store


def read_rate(store: TrajectoryStore, checked: bool) -> float:
    real = store_module.row_problem
    if not checked:
        store_module.row_problem = lambda *args: None  # the check switched off
    try:
        start = time.perf_counter()
        n = sum(1 for _ in store.iter())
        return n / (time.perf_counter() - start)
    finally:
        store_module.row_problem = real


def measure(store: TrajectoryStore, rounds: int) -> tuple[float, float, list[float]]:
    checked, unchecked = [], []
    for r in range(rounds):
        sides = [(True, checked), (False, unchecked)]
        for flag, rates in sides if r % 2 == 0 else sides[::-1]:
            rates.append(read_rate(store, flag))
    ratios = [c / u for c, u in zip(checked, unchecked, strict=True)]
    return median(checked), median(unchecked), ratios


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = fill(f"sqlite:///{Path(tmp) / 'read.db'}", args.n, args.turns)
        checked, unchecked, ratios = measure(store, args.rounds)
        store.close()
    print(
        f"sqlite: checked {checked:,.0f} trajectories/s, unchecked {unchecked:,.0f} trajectories/s "
        f"(medians of {args.rounds} rounds; per-round ratios {', '.join(f'{x:.3f}' for x in ratios)})"
    )
    if args.postgres:
        from tests.pg_server import PostgresServer, find_bindir

        bindir = find_bindir()
        if bindir is None:
            print("postgresql: skipped (no binaries)")
        else:
            server = PostgresServer(bindir)
            server.start()
            try:
                store = fill(server.create_database("read"), args.n, args.turns)
                pg_checked, pg_unchecked, pg_ratios = measure(store, args.rounds)
                store.close()
                print(
                    f"postgresql: checked {pg_checked:,.0f} trajectories/s, unchecked {pg_unchecked:,.0f} "
                    f"trajectories/s (ratio {median(pg_ratios):.3f})"
                )
            finally:
                server.stop()
    print(f"ratio={median(ratios):.3f}")


if __name__ == "__main__":
    main()
