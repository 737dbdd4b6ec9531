"""The evaluation gate in the loop: deploy a candidate that passes it, else roll back.

A candidate is evaluated on held-out tasks and compared with the deployed version
(`safactory.evolve.gate`). Accepted: it becomes the deployed version. Refused: the
deployed checkpoint is reloaded into the trainer and served as a new version, and the
versions trained since the deployed one are remembered as refused (their rollouts are
never trained on). Every decision is stored and logged.
"""

from __future__ import annotations

from safactory.evolve.checkpoint import load_checkpoint
from safactory.evolve.gate import Gate
from safactory.factory.checkpoints import checkpoint
from safactory.factory.context import RunContext
from safactory.factory.heldout import evaluate
from safactory.factory.learner import Learner, publish


async def gate(ctx: RunContext, learner: Learner, label: str, step: int) -> bool:
    """Evaluate the current weights; deploy them if they pass the gate, else roll back."""
    cfg = ctx.config.gate
    metrics = await evaluate(ctx, learner, label)
    deployed = learner.deployed
    baseline = deployed["metrics"] if cfg.enabled else metrics  # gate off: always deploy
    success_key = "safe_success_rate" if cfg.success == "safe" else "success_rate"
    decision = Gate(cfg.max_unsafe_increase, cfg.max_success_drop, success_key).decide(
        metrics, baseline, step=step, candidate_version=learner.policy.version, baseline_version=deployed["version"]
    )
    record = {"learner": learner.name, "label": label, **decision.as_dict()}
    ctx.summary["gate"].append(record)
    ctx.store.add_gate_decision(learner.run_id, record)
    ctx.metrics.log({"gate/accepted": decision.accepted, "gate/candidate_version": decision.candidate_version})
    if decision.accepted:
        learner.deployed = {"version": learner.policy.version, "metrics": metrics}
        checkpoint(learner, step)
        ctx.log(f"[{learner.name}] gate: v{learner.policy.version} deployed")
    else:
        ctx.log(f"[{learner.name}] gate refused v{learner.policy.version}: {'; '.join(decision.reasons)}")
        await rollback(ctx, learner)
        checkpoint(learner, step)
    ctx.milestone()
    return decision.accepted


async def rollback(ctx: RunContext, learner: Learner) -> None:
    """Reload the deployed checkpoint into the trainer and serve it as a new version."""
    path = learner.checkpoints / learner.deployed["checkpoint"]
    load_checkpoint(path, learner.trainer.model, learner.trainer.optimizer)
    await publish(ctx, learner, parent=learner.deployed["version"])
    learner.deployed = {**learner.deployed, "version": learner.policy.version}


def refused_versions(ctx: RunContext, learner: Learner) -> set[int]:
    """Versions the gate rolled back: each refused candidate and those trained since the deployed one."""
    refused: set[int] = set()
    for d in ctx.store.gate_decisions(learner.run_id):
        if not d["accepted"]:
            refused.update(range(d["baseline_version"] + 1, d["candidate_version"] + 1))
    return refused
