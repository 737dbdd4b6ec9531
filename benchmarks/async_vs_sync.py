"""Asynchronous (eta=2) vs synchronous (eta=0) RL: wall-clock to the same held-out success.

Run: `python benchmarks/async_vs_sync.py [--mode in-process|served] [--steps 60] [--out runs/bench-async]`.
One warm start (SFT on arith demonstrations) is shared; then the same RL phase runs twice
from it, with eta=0 and eta=2, evaluating on held-out tasks every 10 steps. The target is
95% of the lower of the two best held-out successes; the figure is the ratio of the RL
wall-clock each needed to reach it. Last line: `ratio=<t_sync / t_async>`.

Modes (the comparison is otherwise identical; each mode's ratio is internal to it):

* `in-process` (default): generation and training share this process (and its torch
  threads).
* `served`: rollouts and evaluations run in a separate process, a
  `safactory serve-policy` server on a free loopback port started fresh for each arm from
  the warm start (so both arms start from the same weights) and always stopped after it;
  the run reaches it through `rollout.endpoint` and publishes each new version to it
  (disk + POST /v1/load_weights). The server runs with `OMP_NUM_THREADS=1` and the
  trainer (this process) with one torch thread, so generation and training each have a
  core of their own and the model's forward passes do not share a GIL with training.
  On 2 CPU cores it runs about half as fast as in-process and its asynchronous gain is no
  larger (docs/benchmarks.md): the HTTP client side of ~500 requests per step runs in the
  trainer's process, on the trainer's core.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from safactory.config import load_config
from safactory.factory.loop import Factory

SERVER_START_TIMEOUT_S = 120.0
SERVER_STOP_TIMEOUT_S = 15.0


def rl_curve(summary: dict) -> list[tuple[float, float]]:
    """(seconds since RL started, held-out success) for each evaluation during and after RL."""
    start = summary["rl"]["started_s"]
    rows = [*summary.get("evals", {}).values(), summary["phases"]["rl"]]
    return sorted((r["time_s"] - start, r["success_rate"]) for r in rows)


def first_reach(curve: list[tuple[float, float]], target: float) -> float:
    return next((t for t, s in curve if s >= target), float("inf"))


def free_port(host: str) -> int:
    """A TCP port the OS reports free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def served_model_name(base_url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """Wait until the server answers GET /v1/models; return the model name it serves."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"policy server exited with code {proc.returncode} before it answered")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=5) as response:
                return str(json.load(response)["data"][0]["id"])
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"policy server at {base_url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.25)


@contextmanager
def policy_server(model_dir: Path, log_path: Path, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `safactory serve-policy` on `model_dir` in a subprocess (one torch thread); yield its endpoint spec."""
    port = port or free_port(host)
    command = [
        sys.executable,
        "-c",
        "from safactory.cli import main; main()",
        "serve-policy",
        "--model",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            base_url = f"http://{host}:{port}/v1"
            name = served_model_name(base_url, proc, SERVER_START_TIMEOUT_S)
            yield f"openai:{base_url}#{name}"
        finally:
            proc.terminate()
            try:
                proc.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_arm(overrides: list[str], out: Path, endpoint: str | None) -> dict:
    if endpoint is not None:
        overrides = [*overrides, f"rollout.endpoint={endpoint}"]
    return Factory(load_config("examples/arith.yaml", overrides), out).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("in-process", "served"), default="in-process")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-async")
    parser.add_argument("--port", type=int, default=0, help="served mode: server port (0: a free one per arm)")
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for both arms (e.g. env.test_tasks=20 for a quick smoke run)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    warm = out / "warm"
    if not (warm / "model").exists():
        Factory(load_config("examples/arith.yaml", [f"seed={args.seed}", "rl.enabled=false"]), warm).run()
    served = args.mode == "served"
    if served:
        torch.set_num_threads(1)  # the trainer's core; the server has the other
    arms_dir = out / "served" if served else out
    results = {}
    for eta in (0, 2):
        overrides = [
            f"seed={args.seed}",
            f"model.path={warm / 'model'}",
            "sft.enabled=false",
            f"rl.steps={args.steps}",
            f"rl.eta={eta}",
            "rl.eval_every=10",
            "rl.warmup_steps=10",  # RL starts with a fresh optimiser here
            "gate.enabled=false",  # compare the two schedules, not rollbacks
            *args.extra,
        ]
        if served:
            with policy_server(warm / "model", arms_dir / f"server-eta{eta}.log", port=args.port) as endpoint:
                summary = run_arm(overrides, arms_dir / f"eta{eta}", endpoint)
        else:
            summary = run_arm(overrides, arms_dir / f"eta{eta}", None)
        results[eta] = {
            "curve": rl_curve(summary),
            "trainer_idle": summary["rl"]["trainer_idle_fraction"],
            "rollout_idle": summary["rl"]["rollout_idle_fraction"],
        }
    best = min(max(s for _, s in r["curve"]) for r in results.values())
    target = 0.95 * best
    t_sync, t_async = (first_reach(results[eta]["curve"], target) for eta in (0, 2))
    print(f"mode={args.mode}")
    for eta in (0, 2):
        curve = ", ".join(f"{t:.0f}s:{s:.2f}" for t, s in results[eta]["curve"])
        r = results[eta]
        print(
            f"eta={eta}: trainer idle fraction {r['trainer_idle']:.2f}, rollout idle fraction "
            f"{r['rollout_idle']:.2f}; held-out curve {curve}"
        )
    print(f"target held-out success {target:.3f}: eta=0 reached it after {t_sync:.0f} s, eta=2 after {t_async:.0f} s")
    print(f"ratio={t_sync / t_async:.3f}")


if __name__ == "__main__":
    main()
