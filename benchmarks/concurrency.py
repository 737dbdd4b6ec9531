"""Benchmark: 10,000 concurrent episodes in one process, all completed and stored; peak memory.

The policy is a stub that awaits a short `asyncio.sleep` before each answer (so that
every episode really is in flight at the same time, as with a remote model) and then
answers as the arith expert would; the environment is the built-in `arith` (cheap,
two steps per episode). The runner runs with concurrency equal to the number of
episodes and streams each finished group into a SQLite store in a temporary
directory through `StoreWriter`. At the end the benchmark checks that every episode
finished and was stored, and reports the peak resident set size of the process
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) as `rss_mib=<value>` (target < 2048).

Run: `.venv/bin/python benchmarks/concurrency.py [--episodes N] [--sleep S]`
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

from safactory.data.store import TrajectoryStore
from safactory.data.writer import StoreWriter
from safactory.policy.base import Completion, SamplingParams
from safactory.sim.agent import EpisodeLimits
from safactory.sim.envs.arith import ArithEnv, ArithExpert, ArithTasks
from safactory.sim.runner import Admission, RolloutRunner
from safactory.types import Message, ToolSpec, Trajectory


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class SleepyExpert:
    """Waits `sleep_s` (a stand-in for a remote model) and then answers as the arith expert."""

    version = 0

    def __init__(self, sleep_s: float) -> None:
        self.sleep_s = sleep_s
        self.expert = ArithExpert()
        self.in_flight = 0
        self.peak_in_flight = 0

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.sleep_s)
        finally:
            self.in_flight -= 1
        return await self.expert.generate(messages, tools, sampling)


async def run(episodes: int, sleep_s: float, directory: Path) -> dict[str, float]:
    tasks = ArithTasks().tasks("test", episodes)
    store = TrajectoryStore.in_dir(directory)
    run_id = "bench-concurrency"
    store.create_run(run_id, {"benchmark": "concurrency", "episodes": episodes})
    writer = StoreWriter(store)
    policy = SleepyExpert(sleep_s)
    runner = RolloutRunner(ArithEnv, policy, limits=EpisodeLimits(), concurrency=episodes, run_id=run_id)
    outcome = {"finished": 0, "success": 0}

    async def sink(group: list[Trajectory]) -> None:
        await writer.put(group)  # durable before it counts
        outcome["finished"] += len(group)
        outcome["success"] += sum(t.success for t in group)

    admission = Admission(groups_per_batch=episodes, eta=0, version=lambda: 0)  # admits every group at once
    start = time.perf_counter()
    await runner.stream(iter(tasks), 1, SamplingParams(), admission, sink)
    await writer.close()
    elapsed = time.perf_counter() - start
    stored = store.count(run_id=run_id)
    store.close()
    assert outcome["finished"] == episodes, f"{outcome['finished']} of {episodes} episodes finished"
    assert outcome["success"] == episodes, f"{outcome['success']} of {episodes} episodes succeeded"
    assert stored == episodes, f"{stored} of {episodes} trajectories stored"
    return {"elapsed_s": elapsed, "stored": stored, "peak_in_flight": policy.peak_in_flight}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=10_000)
    parser.add_argument("--sleep", type=float, default=0.05, help="seconds the stub policy waits per turn")
    args = parser.parse_args()
    baseline = peak_rss_mib()
    with tempfile.TemporaryDirectory(prefix="safactory-bench-") as tmp:
        result = asyncio.run(run(args.episodes, args.sleep, Path(tmp)))
    peak = peak_rss_mib()
    print(
        f"episodes={args.episodes} stored={result['stored']} peak_in_flight={result['peak_in_flight']} "
        f"elapsed_s={result['elapsed_s']:.1f} episodes_per_s={args.episodes / result['elapsed_s']:.0f}"
    )
    print(f"rss_before_mib={baseline:.0f} per_episode_kib={(peak - baseline) * 1024 / args.episodes:.1f}")
    print(f"rss_mib={peak:.0f}")


if __name__ == "__main__":
    main()
