"""On-policy distillation vs RL: episodes needed to reach 90% of the teacher's held-out success.

Run: `python benchmarks/opd_vs_rl.py [--rl-steps 100] [--out runs/bench-opd]`. One SFT warm
start on arith is shared. RL (GRPO, 32 tasks x 8 episodes per step) trains the teacher from
it, with held-out evaluations every 10 steps. Then, from the same warm start, the student
learns by OPD from that teacher (32 tasks x 1 episode per step at temperature 0.7, the
teacher scoring the student's own tokens at the same temperature, lr 1e-4), evaluated
every 10 steps. A finished teacher run in OUT/rl is reused. Target: 90% of the teacher's final
held-out success. Last line: `ratio=<RL episodes to target / OPD episodes to target>`
(target >= 3).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safactory.config import load_config
from safactory.factory.loop import Factory


def curve(summary: dict) -> list[tuple[int, float]]:
    """(rollout episodes used so far, held-out success) for every evaluation of the RL phase."""
    rows = [*summary.get("evals", {}).values(), summary["phases"]["rl"]]
    return sorted((r["rl_episodes"], r["success_rate"]) for r in rows)


def episodes_to(points: list[tuple[int, float]], target: float) -> float:
    return next((float(e) for e, s in points if s >= target), float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rl-steps", type=int, default=100)
    parser.add_argument("--opd-steps", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-opd")
    args = parser.parse_args()
    out = Path(args.out)
    base = ["examples/arith.yaml"]
    warm = out / "warm"
    if not (warm / "model").exists():
        Factory(load_config(base[0], [f"seed={args.seed}", "rl.enabled=false"]), warm).run()
    start = [f"seed={args.seed}", f"model.path={warm / 'model'}", "sft.enabled=false", "gate.enabled=false"]
    if (out / "rl" / "summary.json").exists():  # reuse a finished teacher run
        teacher = json.loads((out / "rl" / "summary.json").read_text())
    else:
        teacher_cfg = load_config(base[0], [*start, f"rl.steps={args.rl_steps}", "rl.eval_every=10"])
        teacher = Factory(teacher_cfg, out / "rl").run()
    opd_overrides = [
        *start,
        f"rl.steps={args.opd_steps}",
        "rl.objective=opd",
        f"rl.teacher={out / 'rl' / 'model'}",
        "rl.group_size=1",
        "rl.lr=1e-4",
        "rl.eval_every=10",
    ]
    student = Factory(load_config(base[0], opd_overrides), out / "opd").run()
    teacher_success = teacher["phases"]["rl"]["success_rate"]
    target = 0.9 * teacher_success
    rl_points, opd_points = curve(teacher), curve(student)
    rl_episodes, opd_episodes = episodes_to(rl_points, target), episodes_to(opd_points, target)
    print(f"warm start held-out success {teacher['phases']['init']['success_rate']:.3f}")
    print(f"teacher (RL) held-out success {teacher_success:.3f}; target {target:.3f}")
    print("RL curve: " + ", ".join(f"{e}:{s:.2f}" for e, s in rl_points))
    print("OPD curve: " + ", ".join(f"{e}:{s:.2f}" for e, s in opd_points))
    print(f"episodes to target: RL {rl_episodes:.0f}, OPD {opd_episodes:.0f}")
    print(f"ratio={rl_episodes / opd_episodes:.2f}")


if __name__ == "__main__":
    main()
