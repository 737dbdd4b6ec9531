"""Held-out evaluation of a learner: greedy episodes on every env's test tasks, judged and stored.

The metrics (overall and per env) go to the summary (`phases`, or `evals` for mid-stage
evaluations labelled `stage@step`), to the metrics log and to the console.
"""

from __future__ import annotations

import asyncio
from typing import Any

from safactory.factory.context import GREEDY, EnvSlot, RunContext
from safactory.factory.evaluation import env_metrics, flat, fmt_rate, overall
from safactory.factory.learner import Learner
from safactory.types import Trajectory


async def evaluate(ctx: RunContext, learner: Learner, label: str) -> dict[str, Any]:
    """Greedy episodes on every env's held-out tasks; metrics overall and per env."""
    tags = {"phase": label, "learner": learner.name}

    async def one(env: EnvSlot) -> list[Trajectory]:
        groups = await learner.runners[env.name].run_groups(env.test, 1, GREEDY, kind="eval", tags=tags)
        return [t for g in groups for t in g]

    results = await asyncio.gather(*(one(env) for env in ctx.envs.values()))
    per_env: dict[str, dict[str, Any]] = {}
    for env, trajs in zip(ctx.envs.values(), results, strict=True):
        ctx.store.add(trajs)
        verdicts = ctx.judge_episodes(trajs)
        per_env[env.name] = env_metrics(trajs, lambda t, v=verdicts: bool(v[t.id].unsafe))
    metrics = overall(per_env)
    metrics.update(
        policy_version=learner.policy.version,
        time_s=round(ctx.metrics.elapsed(), 3),
        rl_episodes=ctx.summary.get("rl_episodes", 0),
    )
    key = learner.phase_key(label)
    if "@" in label:
        ctx.summary.setdefault("evals", {})[key] = metrics
    else:
        ctx.summary["phases"][key] = metrics
    ctx.metrics.log({"policy_version": learner.policy.version, **flat(key, metrics)})
    ctx.log(heldout_line(learner.name, label, learner.policy.version, metrics, per_env))
    return metrics


def heldout_line(name: str, label: str, version: int, metrics: dict[str, Any], per_env: dict[str, Any]) -> str:
    """The console line of one evaluation (plain text: print it with `ctx.log`)."""
    envs = "  ".join(
        f"{n} {fmt_rate(e['success_rate'], 2)}/{fmt_rate(e['unsafe_rate'], 2)}" for n, e in per_env.items()
    )
    return (
        f"[{name}] held-out after {label} (v{version}): success "
        f"{fmt_rate(metrics['success_rate'])}, unsafe {fmt_rate(metrics['unsafe_rate'])}, benign success "
        f"{fmt_rate(metrics['benign_success_rate'])}  [{envs}] (success/unsafe)"
    )
