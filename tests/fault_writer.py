"""A writer process for the fault campaign: stores batches of synthetic trajectories and says
what the store acknowledged, line by line, so a test that kills it or restarts its database
knows exactly which rows must be there.

    python -m tests.fault_writer URL RUN_ID BATCHES SEED [--retry]

Each batch of 10 is one `TrajectoryStore.add` (one transaction); once it returns the writer
prints `ack <id> ...`. When an add fails it prints `error <type>: <message>` (one line) and,
with `--retry`, adds the same batch again until it is stored (adding is idempotent, so a
commit whose answer was lost is not stored twice), or gives up after a minute; without
`--retry` it exits with status 3. It prints `done` after the last batch.
"""

from __future__ import annotations

import random
import sys
import time

from safactory.data.store import TrajectoryStore
from tests.synthetic import synthetic_trajectory

RETRY_FOR_S = 60.0


def main() -> None:
    url, run_id, batches, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    retry = "--retry" in sys.argv[5:]
    rng = random.Random(seed)
    store = TrajectoryStore(url)
    store.create_run(run_id, {})
    for _ in range(batches):
        batch = [synthetic_trajectory(run_id, rng, turns=2, tokens_per_turn=8) for _ in range(10)]
        for i, traj in enumerate(batch):  # ids from the seed, so a rerun writes the same rows again
            traj.id = f"{run_id}-{seed}-{rng.getrandbits(64):016x}-{i}"
        give_up = time.monotonic() + RETRY_FOR_S
        while True:
            try:
                store.add(batch)
                break
            except Exception as exc:  # the database went away: say so, then retry or stop
                message = " ".join(str(exc).split())[:300]
                print(f"error {type(exc).__name__}: {message}", flush=True)
                if not retry or time.monotonic() > give_up:
                    sys.exit(3)
                time.sleep(0.1)
        print("ack " + " ".join(t.id for t in batch), flush=True)
    print("done", flush=True)
    store.close()


if __name__ == "__main__":
    main()
