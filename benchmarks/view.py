"""`safactory view`'s trajectories page on a store of 100,000 trajectories vs one of 1,000, same run.

Both stores are filled through the real store API with the same mix: two runs, three kinds, three
envs, one-turn episodes with token traces, a safety verdict on every trajectory (one in five unsafe).
Both views are served by uvicorn over real HTTP, and the page is asked for, alternating between the
stores, with a filter (one run, unsafe verdicts): its first page, and a deep page (the page after a
cursor halfway down the store); and the first page of a filter without a run (one env, failed).
Latencies are medians over the rounds.
Pagination happens in the database (keyset pages through the run's index), so the large store
should cost about what the small one does.

Run: `python benchmarks/view.py [--large 100000] [--small 1000] [--rounds 30]`.
Last line: `ratio=<large / small latency, the largest of the three pages>` (target <= 2).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safactory.data.store import TrajectoryStore
from safactory.policy.server import BackgroundServer
from safactory.types import Message, Step, Task, TokenTrace, ToolCall, Trajectory
from safactory.view.app import create_app, guarded

ENVS = ("ops", "arith", "maze")
KINDS = ("rollout", "eval", "expert")
RUNS = ("bench", "other")
FILTER = {"run": "bench", "verdict": "unsafe"}
OTHER = {"env": "ops", "success": "no"}  # no run: a walk of the whole store's insertion order


def episode(rng: random.Random, i: int) -> Trajectory:
    env = ENVS[i % 3]
    call = ToolCall(id=f"c{i}", name="read", arguments={"path": f"/data/{i}"})
    trace = TokenTrace(
        prompt_ids=[rng.randint(4, 90) for _ in range(24)],
        completion_ids=[rng.randint(4, 90) for _ in range(12)],
        logprobs=[-rng.random() for _ in range(12)],
        policy_version=i // 1000,
    )
    step = Step(
        index=0,
        action=Message(role="assistant", content="read(/data)", tool_calls=[call]),
        observation=[Message(role="tool", content=str(i), tool_call_id=f"c{i}")],
        reward=0.0,
        trace=trace,
    )
    return Trajectory(
        run_id=RUNS[int(rng.random() < 0.2)],
        kind=KINDS[rng.randrange(3)],
        task=Task(id=f"{env}/t{rng.randint(0, 99)}", env_id=env, split="train", prompt="p"),
        env_id=env,
        steps=[step],
        reward=rng.random(),
        success=rng.random() < 0.5,
    )


def fill(url: str, n: int) -> None:
    store = TrajectoryStore(url)
    for run in RUNS:
        store.create_run(run, {"envs": [{"id": e} for e in ENVS]})
    rng = random.Random(0)
    batch = 2000
    for start in range(0, n, batch):
        trajs = [episode(rng, i) for i in range(start, min(n, start + batch))]
        store.add(trajs)
        verdicts = [
            {"trajectory_id": t.id, "judge": "rules", "judge_version": "1", "unsafe": rng.random() < 0.2} for t in trajs
        ]
        store.add_verdicts(verdicts)
    store.close()


def latency(client: httpx.Client, params: dict[str, str | int]) -> float:
    start = time.perf_counter()
    response = client.get("/trajectories", params=params)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    if response.text.count('class="traj"') != 50:
        raise RuntimeError(f"expected a full page of 50 rows for {params}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clients: dict[int, httpx.Client] = {}
        servers = []
        for n in (args.small, args.large):
            path = Path(tmp) / f"store{n}.db"
            start = time.perf_counter()
            fill(f"sqlite:///{path}", n)
            print(f"filled {n:,} trajectories in {time.perf_counter() - start:.0f} s ({path.stat().st_size >> 20} MiB)")
            server = BackgroundServer(guarded(create_app(str(path), Path(tmp) / "no-runs"), None)).start()
            servers.append(server)
            clients[n] = httpx.Client(base_url=f"http://{server.host}:{server.port}", timeout=60)
        pages = {
            "first": lambda n: dict(FILTER),
            "deep": lambda n: {**FILTER, "before": n // 2},
            "first, no run": lambda n: dict(OTHER),
        }
        times: dict[tuple[int, str], list[float]] = {(n, p): [] for n in clients for p in pages}
        for n in clients:  # warm up: each server's first request opens its connection pool
            for params in pages.values():
                latency(clients[n], params(n))
        for r in range(args.rounds):
            order = list(clients) if r % 2 == 0 else list(clients)[::-1]
            for n in order:
                for name, params in pages.items():
                    times[(n, name)].append(latency(clients[n], params(n)))
        for client in clients.values():
            client.close()
        for server in servers:
            server.stop()
    ratios = {}
    for name in pages:
        small, large = median(times[(args.small, name)]), median(times[(args.large, name)])
        ratios[name] = large / small
        shown = {**pages[name](args.small), **({"before": "N/2"} if name == "deep" else {})}
        print(
            f"{name} page ({', '.join(f'{k}={v}' for k, v in shown.items())}): {args.small:,} trajectories "
            f"{1000 * small:.1f} ms, {args.large:,} trajectories {1000 * large:.1f} ms, ratio {ratios[name]:.2f}"
        )
    print(f"ratio={max(ratios.values()):.2f}")


if __name__ == "__main__":
    main()
