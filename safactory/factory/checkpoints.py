"""A learner's checkpoints in the run directory: written at milestones, read back on `--resume`.

Each checkpoint also remembers the learner's deployed version (and which checkpoint holds
its weights) and the step reached inside the stage, so a resumed run continues the stage
where it stopped and can still roll back to the deployed weights.
"""

from __future__ import annotations

from safactory.evolve.checkpoint import latest_checkpoint, prune_checkpoints, save_checkpoint
from safactory.evolve.resume import resume_trainer
from safactory.factory.context import RunContext
from safactory.factory.learner import Learner, publish


def checkpoint(learner: Learner, stage_step: int) -> None:
    """Save the learner's weights and optimiser; keep only the latest and the deployed checkpoint."""
    name = f"step-{learner.trainer.step:06d}"
    if learner.deployed.get("checkpoint") is None or learner.deployed["version"] == learner.policy.version:
        learner.deployed["checkpoint"] = name
    elif learner.deployed["checkpoint"] == name:  # would replace the deployed weights with undeployed ones
        raise RuntimeError(f"refusing to overwrite the deployed checkpoint {name} with v{learner.policy.version}")
    path = save_checkpoint(
        learner.checkpoints,
        model=learner.trainer.model,
        tokenizer=learner.tokenizer,
        optimizer=learner.trainer.optimizer,
        version=learner.policy.version,
        parent_version=None,
        train_step=learner.trainer.step,
        extra={"stage_step": stage_step, "deployed": learner.deployed},
    )
    prune_checkpoints(learner.checkpoints, keep={path.name, learner.deployed["checkpoint"]})


async def restore(ctx: RunContext, learner: Learner) -> int:
    """Load the learner's latest checkpoint and serve it as a new version; returns the stage step
    it was written at."""
    if latest_checkpoint(learner.checkpoints) is None:  # refused before any consumption is released
        raise RuntimeError(f"cannot resume: no checkpoint under {learner.checkpoints}")
    resumed = resume_trainer(learner.checkpoints, learner.trainer, ctx.store, learner.consumer)
    meta = resumed.meta
    assert resumed.path is not None and meta is not None
    learner.deployed = dict(meta.extra["deployed"])
    await publish(ctx, learner, parent=meta.version)
    ctx.log(
        f"[{learner.name}] resumed from {resumed.path.name} (v{meta.version}, stage step {meta.extra['stage_step']}) "
        f"as v{learner.policy.version}; {resumed.released} consumptions of lost steps released"
    )
    return int(meta.extra["stage_step"])
