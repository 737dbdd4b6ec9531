"""Scale-out: rollout episodes/s of a CPU-bound env on one Ray node vs two, and PostgreSQL ingest with
4 concurrent writers vs 1, each pair measured in the same run.

Run: `python benchmarks/scale.py [--groups 24] [--group-size 4] [--steps 8] [--step-ms 5] [--ingest 2000]`.

Rollouts: a real local Ray cluster (tests/ray_cluster.py: `ray start` nodes of 1 CPU each on this
machine). An env whose every step burns about `--step-ms` of CPU time (a hash loop timed on the
thread's CPU clock), `--steps` steps an episode, against a policy that answers at once, so the env is
the work. Phase 1: the head node alone, one rollout worker; phase 2: a second node joined, two
workers; each phase warms up, then times `--groups` groups of `--group-size` episodes played and
stored (SQLite, one transaction per group) by `RayRolloutPool.run_groups`. Figures: episodes/s and
episodes/s per worker core.

Ingest: a throwaway PostgreSQL server (tests/pg_server.py); synthetic 3-turn trajectories with token
traces written a group of 8 per transaction (as workers write), by 1 process and by 4 processes at
once, into one run (what one learner's workers do: adds to one run take its row lock in turn) and
into 4 runs; trajectories/s and rows/s (trajectory + step + trace rows).

Last line: `ratio=<episodes/s on two nodes / on one>` (target >= 1.6; needs two free cores).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' cluster, server and trajectories

from safactory.data.group_writer import StoreTarget
from safactory.data.store import TrajectoryStore
from safactory.policy.base import Completion, SamplingParams
from safactory.sim.agent import EpisodeLimits
from safactory.sim.env import EnvSpec
from safactory.sim.ray_executor import RayOptions, RayRolloutPool
from safactory.sim.ray_worker import WorkerSetup
from safactory.types import Message, Observation, StepResult, Task, ToolSpec
from tests.pg_server import PostgresServer, find_bindir
from tests.ray_cluster import SETTINGS, RayCluster
from tests.synthetic import synthetic_trajectory

# ---- a CPU-bound env and an instant policy (defined here: Ray sends them to the workers by value) ----


class BurnEnv:
    """Each step burns `step_ms` of CPU time; the episode ends after `steps` steps."""

    spec = EnvSpec(id="burn", version="1", max_turns=1000)

    def __init__(self, steps: int, step_ms: float) -> None:
        self.steps, self.step_s, self.done = steps, step_ms / 1000, 0

    async def reset(self, task: Task, seed: int) -> Observation:
        return Observation(messages=[Message(role="user", content=task.prompt)])

    async def step(self, action: Message) -> StepResult:
        start = time.thread_time()
        digest = b"x"
        while time.thread_time() - start < self.step_s:
            for _ in range(200):
                digest = hashlib.sha256(digest).digest()
        self.done += 1
        ended = self.done >= self.steps
        return StepResult(messages=[Message(role="user", content="go on")], reward=float(ended), terminated=ended)

    async def close(self) -> None:
        return None


class BurnEnvFactory:
    def __init__(self, steps: int, step_ms: float) -> None:
        self.steps, self.step_ms = steps, step_ms

    def __call__(self) -> BurnEnv:
        return BurnEnv(self.steps, self.step_ms)


class Instant:
    """A policy that answers at once."""

    version = 0

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        return Completion(text="step")


class InstantFactory:
    def __call__(self, index: int) -> Instant:
        return Instant()


# ---- rollouts on one node vs two --------------------------------------------------------------------


def rollout_phase(url: str, args: argparse.Namespace, label: str) -> tuple[float, int]:
    """Episodes/s of `args.groups` groups on the cluster as it is now, and the number of workers."""
    setup = WorkerSetup(
        policy=InstantFactory(),
        envs={"burn": BurnEnvFactory(args.steps, args.step_ms)},
        store=StoreTarget(url, redact=False),
        limits=EpisodeLimits(max_turns=args.steps, max_tokens_per_turn=8),
        run_id="bench",
        concurrency=args.group_size * 2,
    )
    pool = RayRolloutPool(setup, RayOptions(groups_per_worker=2), name=f"bench-{label}").start()
    sampling = SamplingParams(temperature=0.0, max_tokens=8)
    tasks = [Task(id=f"t{i}", env_id="burn", split="train", prompt=f"task {i}") for i in range(args.groups)]

    async def play(n: int) -> float:
        async def sink(job: Any, ids: list[str]) -> None:
            return None

        start = time.perf_counter()
        await pool.run_groups("burn", [(t, args.group_size, 0) for t in tasks[:n]], sampling, sink)
        return time.perf_counter() - start

    try:
        asyncio.run(play(max(2, len(pool.workers) * 2)))  # warm-up: every worker has played
        elapsed = asyncio.run(play(args.groups))
    finally:
        workers = len(pool.workers)
        pool.close()
    return args.groups * args.group_size / elapsed, workers


def rollouts(args: argparse.Namespace) -> float:
    import os

    os.environ.update(SETTINGS)
    cluster = RayCluster()
    tmp = Path(tempfile.mkdtemp(prefix="sf-scale-"))
    url = f"sqlite:///{tmp / 'store.db'}"
    store = TrajectoryStore(url)
    store.create_run("bench", {})
    store.close()
    try:
        cluster.start()
        one, w1 = rollout_phase(url, args, "one")
        cluster.add_node("node2", "127.0.0.2")
        two, w2 = rollout_phase(url, args, "two")
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    per = args.steps * args.step_ms / 1000
    print(f"env: {args.steps} steps x {args.step_ms} ms CPU = {per * 1000:.0f} ms of CPU per episode")
    print(f"one node: {w1} worker,  {one:7.1f} episodes/s ({one / w1:6.1f} per worker core)")
    print(f"two nodes: {w2} workers, {two:7.1f} episodes/s ({two / w2:6.1f} per worker core)")
    return two / one


# ---- PostgreSQL ingest: 4 writers vs 1 ---------------------------------------------------------------


def _writer(url: str, run_id: str, n: int, seed: int, group: int, out: Any) -> None:
    rng = random.Random(seed)
    trajs = [synthetic_trajectory(run_id, rng) for _ in range(n)]
    rows = sum(1 + 2 * len(t.steps) for t in trajs)
    store = TrajectoryStore(url)
    out.put(("ready", 0.0, 0))
    start = time.perf_counter()
    for i in range(0, n, group):
        store.add(trajs[i : i + group])
    out.put(("done", time.perf_counter() - start, rows))
    store.close()


def ingest(url: str, writers: int, n: int, runs: int) -> tuple[float, float]:
    """(trajectories/s, rows/s) of `writers` processes writing `n` trajectories in all, into `runs` runs."""
    store = TrajectoryStore(url)
    run_ids = [f"ingest-{uuid.uuid4().hex[:8]}" for _ in range(runs)]
    for run_id in run_ids:
        store.create_run(run_id, {})
    store.close()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(url, run_ids[i % runs], n // writers, i, 8, out)) for i in range(writers)
    ]
    for p in procs:
        p.start()
    results = [out.get() for _ in range(2 * writers)]
    for p in procs:
        p.join()
    done = [r for r in results if r[0] == "done"]
    wall = max(r[1] for r in done)  # they start together (each built its data first); the slowest ends it
    return n / wall, sum(r[2] for r in done) / wall


def postgres_ingest(args: argparse.Namespace) -> None:
    bindir = find_bindir()
    if bindir is None:
        print("ingest: no PostgreSQL binaries on this machine (set SAFACTORY_PG_BINDIR); skipped")
        return
    server = PostgresServer(bindir)
    server.start()
    try:
        for runs, what in ((1, "one run"), (4, "4 runs")):
            one = ingest(server.create_database(f"i{uuid.uuid4().hex[:8]}"), 1, args.ingest, 1)
            four = ingest(server.create_database(f"i{uuid.uuid4().hex[:8]}"), 4, args.ingest, runs)
            print(
                f"postgres ingest, {what}: 1 writer {one[0]:7.0f} traj/s ({one[1]:7.0f} rows/s); "
                f"4 writers {four[0]:7.0f} traj/s ({four[1]:7.0f} rows/s); ratio {four[0] / one[0]:.2f}"
            )
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=24)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--ingest", type=int, default=2000, help="trajectories per ingest measurement")
    args = parser.parse_args()
    postgres_ingest(args)
    ratio = rollouts(args)
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
