"""A writer process for the crash test: stores synthetic trajectories and prints an `ack` line
with their ids after each commit, so the test knows exactly what was acknowledged."""

from __future__ import annotations

import random
import sys

from safactory.data.store import TrajectoryStore
from tests.synthetic import synthetic_trajectory as synthetic


def main() -> None:
    url, run_id, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = TrajectoryStore(url)
    store.create_run(run_id, {})
    rng = random.Random()
    for _ in range(batches):
        batch = [synthetic(run_id, rng) for _ in range(20)]
        store.add(batch)
        print("ack " + " ".join(t.id for t in batch), flush=True)


if __name__ == "__main__":
    main()
