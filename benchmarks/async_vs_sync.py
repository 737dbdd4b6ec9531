"""Asynchronous (eta=2) vs synchronous (eta=0) RL: wall-clock to the same held-out success.

Run: `python benchmarks/async_vs_sync.py [--steps 60] [--out runs/bench-async]`. One warm
start (SFT on arith demonstrations) is shared; then the same RL phase runs twice from
it, with eta=0 and eta=2, evaluating on held-out tasks every 10 steps. The target is
95% of the lower of the two best held-out successes; the figure is the ratio of the
RL wall-clock each needed to reach it. Last line: `ratio=<t_sync / t_async>`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safactory.config import load_config
from safactory.loop import Factory


def rl_curve(summary: dict) -> list[tuple[float, float]]:
    """(seconds since RL started, held-out success) for each evaluation during and after RL."""
    start = summary["rl"]["started_s"]
    rows = [*summary.get("evals", {}).values(), summary["phases"]["rl"]]
    return sorted((r["time_s"] - start, r["success_rate"]) for r in rows)


def first_reach(curve: list[tuple[float, float]], target: float) -> float:
    return next((t for t, s in curve if s >= target), float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-async")
    args = parser.parse_args()
    out = Path(args.out)
    warm = out / "warm"
    if not (warm / "model").exists():
        Factory(load_config("examples/arith.yaml", [f"seed={args.seed}", "rl.enabled=false"]), warm).run()
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
        ]
        summary = Factory(load_config("examples/arith.yaml", overrides), out / f"eta{eta}").run()
        results[eta] = {
            "curve": rl_curve(summary),
            "trainer_idle": summary["rl"]["trainer_idle_fraction"],
            "rollout_idle": summary["rl"]["rollout_idle_fraction"],
        }
    best = min(max(s for _, s in r["curve"]) for r in results.values())
    target = 0.95 * best
    t_sync, t_async = (first_reach(results[eta]["curve"], target) for eta in (0, 2))
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
