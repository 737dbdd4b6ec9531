"""The demo's ablation: which part of the closed loop does what.

Runs `safactory run examples/demo.yaml --set seed=N ...` once per (variant, seed) and tabulates the
held-out results of each run's `summary.json` (`heldout.warm_start` -> `heldout.final`, the version
the gate deployed) with its wall time. Variants:

* `loop`: the demo as shipped (warm start, then safety-aware RL with the imitation update);
* `sft-only`: no RL; the warm start runs for as many supervised updates as the loop takes in all
  (`sft.max_steps` + `rl.steps`: one imitation update per RL step), on the same demonstrations,
  its learning rate decaying over the same last steps as the loop's imitation update;
* `no-imitation`: the loop without the imitation update (`rl.imitation_lr=0`);
* `no-judge`: the loop without the safety judge's reward shaping (`safety.enabled=false`; the ops
  env's own reward still charges an unsafe action);
* `imitate-all`: the imitation update on every successful demonstration, the naive expert's unsafe
  ones included (`rl.imitation_judged=false`).

    python benchmarks/demo_ablation.py --variants loop sft-only --seeds 0 1 2 --out runs/ablation
    python benchmarks/demo_ablation.py --variants no-imitation no-judge imitate-all --seeds 0 --out runs/ablation

A run whose summary.json exists is not run again (delete its folder to redo it); the table covers
every run under --out of the variants and seeds asked for. About 10 minutes per run on 2 CPU cores
(run one at a time for comparable wall times).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ENVS = ("arith", "maze", "ops")


def variant_sets(name: str, demo: dict[str, Any]) -> list[str]:
    """The `--set` assignments of one variant of the demo config."""
    if name == "loop":
        return []
    if name == "sft-only":
        updates = int(demo["sft"]["max_steps"]) + int(demo["rl"]["steps"])
        decay = int(demo["rl"].get("imitation_decay_steps", 0))  # the loop's imitation lr decay, matched
        return ["rl.enabled=false", f"sft.max_steps={updates}", "sft.target_success=1.0", f"sft.decay_steps={decay}"]
    if name == "no-imitation":
        return ["rl.imitation_lr=0"]
    if name == "no-judge":
        return ["safety.enabled=false"]
    if name == "imitate-all":
        return ["rl.imitation_judged=false"]
    raise SystemExit(f"unknown variant {name!r}")


VARIANTS = ("loop", "sft-only", "no-imitation", "no-judge", "imitate-all")


def run_one(config: Path, variant: str, seed: int, out: Path, demo: dict[str, Any]) -> None:
    if (out / "summary.json").is_file():
        return
    if out.exists():
        shutil.rmtree(out)
    exe = shutil.which("safactory", path=str(Path(sys.executable).parent)) or "safactory"
    sets = [f"seed={seed}", *variant_sets(variant, demo)]
    cmd = [exe, "run", str(config), "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (out / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.0f}\n")


def result(out: Path) -> dict[str, float]:
    """One run's figures: overall and per-env success, ops unsafe and benign success, wall time."""
    held = json.loads((out / "summary.json").read_text())["heldout"]
    warm, final = held["warm_start"], held.get("final") or held["warm_start"]
    row = {
        "warm_success": warm["success_rate"],
        "success": final["success_rate"],
        "warm_ops_unsafe": warm["envs"]["ops"]["unsafe_rate"],
        "ops_unsafe": final["envs"]["ops"]["unsafe_rate"],
        "warm_ops_benign": warm["envs"]["ops"]["benign_success_rate"] or 0.0,
        "ops_benign": final["envs"]["ops"]["benign_success_rate"] or 0.0,
        "wall_min": float((out / "wall_s.txt").read_text()) / 60 if (out / "wall_s.txt").is_file() else float("nan"),
    }
    for env in ENVS:
        row[env] = final["envs"][env]["success_rate"]
    return row


def cell(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v == v]  # NaN: a run without a recorded wall time
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def table(rows: dict[str, list[dict[str, float]]], seeds: dict[str, list[int]]) -> str:
    head = (
        "| variant | seeds | overall success (warm start -> final) | arith | maze | ops | "
        "ops unsafe (warm start -> final) | ops benign success | wall time (min) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for variant, runs in rows.items():

        def col(key: str, runs: list[dict[str, float]] = runs) -> list[float]:
            return [r[key] for r in runs]

        lines.append(
            f"| {variant} | {' '.join(map(str, seeds[variant]))} | "
            f"{cell(col('warm_success'))} -> **{cell(col('success'))}** | {cell(col('arith'))} | "
            f"{cell(col('maze'))} | {cell(col('ops'))} | {cell(col('warm_ops_unsafe'))} -> "
            f"**{cell(col('ops_unsafe'))}** | {cell(col('ops_benign'))} | {cell(col('wall_min'), 1)} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("examples/demo.yaml"))
    parser.add_argument("--variants", nargs="+", default=["loop", "sft-only"], choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--table-only", action="store_true", help="tabulate the runs under --out, run nothing")
    args = parser.parse_args()
    demo = yaml.safe_load(args.config.read_text())
    rows: dict[str, list[dict[str, float]]] = {}
    seeds: dict[str, list[int]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            out = args.out / f"{variant}-{seed}"
            if not args.table_only:
                run_one(args.config, variant, seed, out, demo)
            if (out / "summary.json").is_file():
                rows.setdefault(variant, []).append(result(out))
                seeds.setdefault(variant, []).append(seed)
    print(table(rows, seeds), end="")


if __name__ == "__main__":
    main()
