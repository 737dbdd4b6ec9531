"""The warm start: supervised training on scripted demonstrations read back from the store.

Each env's scripted expert (for `ops`, a helpful but naive agent) plays the first
training tasks through the same runner; the episodes are stored, read back, and the
successful ones are trained on until a greedy probe on training tasks reaches
`sft.target_success` or `sft.max_steps` (the first `sft.first_steps` of them on
`sft.first_envs`' demonstrations alone: a curriculum). The same demonstrations, minus
those the safety judge flags (unless `rl.imitation_judged` is off), seed RL's imitation pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from safactory.evolve.experience import TrainSequence, sequence_weighted, sft_sequence
from safactory.evolve.imitation import ImitationPool, curated
from safactory.evolve.schedule import decayed_lr
from safactory.factory.context import GREEDY, RunContext
from safactory.factory.learner import Learner, publish
from safactory.sim.runner import RolloutRunner
from safactory.types import Task, Trajectory


def success_rate(trajs: list[Trajectory]) -> float:
    return sum(t.success for t in trajs) / len(trajs) if trajs else 0.0


async def demonstrations(ctx: RunContext, learner: Learner, demo_run: str) -> list[Trajectory]:
    """The run's successful expert demonstrations, collected into the store on first use."""
    if not ctx.store.count(run_id=demo_run, kind="expert"):  # a resumed run reuses its stored demos
        for env in ctx.envs.values():
            if env.entry.expert is None:
                raise ValueError(f"environment {env.name!r} has no scripted expert for the demonstrations")
            expert_runner = RolloutRunner(
                env.entry.factory,
                env.entry.expert(**env.expert),
                limits=ctx.limits,
                concurrency=ctx.config.rollout.concurrency,
                run_id=demo_run,
                seed=ctx.config.seed,
                provenance=learner.runners[env.name].provenance,
            )
            groups = await expert_runner.run_groups(
                env.train[: env.demos], 1, GREEDY, kind="expert", tags={"phase": "sft"}
            )
            ctx.store.add([t for g in groups for t in g])
    return [t for t in ctx.store.iter(run_id=demo_run, kind="expert") if t.success]


def demo_sequences(ctx: RunContext, learner: Learner, demos: list[Trajectory]) -> list[TrainSequence]:
    """SFT sequences of demonstrations that fit the model, weighted as `sft.balance` says."""
    context = learner.policy.max_positions
    sequences = [s for s in (sft_sequence(t, learner.chat) for t in demos) if len(s.input_ids) <= context]
    if ctx.config.sft.balance == "sequence":
        sequences = [sequence_weighted(s) for s in sequences]
    return sequences


async def warm_start(ctx: RunContext, learner: Learner, demo_run: str) -> None:
    """SFT on the demonstrations until the probe reaches the target (or `sft.max_steps`)."""
    cfg = ctx.config.sft
    demos = await demonstrations(ctx, learner, demo_run)
    if not demos:
        raise RuntimeError("the experts solved none of the demonstration tasks; nothing to learn from")
    sequences = demo_sequences(ctx, learner, demos)
    context = learner.policy.max_positions
    if len(sequences) < len(demos):
        ctx.log(
            f"[{learner.name}] {len(demos) - len(sequences)} demonstrations longer than the model's "
            f"{context} positions are left out"
        )
    if not sequences:
        raise RuntimeError(f"every demonstration is longer than the model's {context} positions")
    ctx.log(f"[{learner.name}] warm start on {len(sequences)} demonstrations read back from the store")
    first = sequences
    if cfg.first_steps:
        first = first_sequences(demos, sequences, cfg.first_envs, ctx.envs)
        names = ", ".join(cfg.first_envs)
        ctx.log(f"[{learner.name}] curriculum: {len(first)} demonstrations of {names} first, {cfg.first_steps} steps")
    learner.trainer.set_lr(cfg.lr)
    per_env = max(1, cfg.probe_tasks // len(ctx.envs))
    probe_tasks = {env.name: env.train[:per_env] for env in ctx.envs.values()}
    assert ctx.progress is not None
    bar = ctx.progress.add_task(f"{learner.name}: warm start", total=cfg.max_steps, status="")
    probe = 0.0
    step = 0
    for step in range(1, cfg.max_steps + 1):
        pool = first if step <= cfg.first_steps else sequences
        batch = ctx.rng.sample(pool, min(cfg.batch_size, len(pool)))
        if cfg.decay_steps:
            learner.trainer.set_lr(decayed_lr(cfg.lr, step, cfg.max_steps, cfg.decay_steps))
        stats = await asyncio.to_thread(learner.trainer.train_step, batch, "sft")
        ctx.metrics.log(
            {
                "phase": "warm_start",
                "train/step": learner.trainer.step,
                "train/loss": stats["loss"],
                "train/lr": learner.trainer.lr(),
            }
        )
        ctx.progress.update(bar, completed=step, status=f"loss {stats['loss']:.3f}  probe {probe:.2f}")
        if step % cfg.probe_every == 0 or step == cfg.max_steps:
            probe = await _probe(ctx, learner, probe_tasks, step)
            if probe >= cfg.target_success:
                break
    ctx.progress.update(bar, total=step, completed=step, status=f"probe {probe:.2f} after {step} steps")
    ctx.summary[learner.warm_start_key] = {"steps": step, "demos": len(sequences), "probe_success": probe}


def first_sequences(
    demos: list[Trajectory], sequences: list[TrainSequence], first_envs: list[str], envs: Iterable[str]
) -> list[TrainSequence]:
    """The sequences of the curriculum's first steps: those of `first_envs`' demonstrations (of the run's `envs`)."""
    known = set(envs)
    if not first_envs or set(first_envs) - known:
        raise ValueError(f"sft.first_envs must name some of the run's envs {sorted(known)}, got {first_envs}")
    env_of = {t.id: t.task.env_id for t in demos}
    first = [s for s in sequences if env_of.get(s.trajectory_id) in first_envs]
    if not first:
        raise ValueError(f"no demonstrations of sft.first_envs {first_envs} to start the curriculum with")
    return first


async def _probe(ctx: RunContext, learner: Learner, probe_tasks: dict[str, list[Task]], step: int) -> float:
    """Publish the weights and measure greedy success on training tasks (mean over envs)."""
    await publish(ctx, learner)
    rates = []
    for name, tasks in probe_tasks.items():
        groups = await learner.runners[name].run_groups(
            tasks, 1, GREEDY, kind="eval", tags={"phase": "sft_probe", "step": step}
        )
        trajs = [t for g in groups for t in g]
        ctx.store.add(trajs)
        rates.append(success_rate(trajs))
    probe = sum(rates) / len(rates)
    ctx.metrics.log({"policy_version": learner.policy.version, "sft/probe_success": probe})
    return probe


async def imitation_pool(ctx: RunContext, learner: Learner) -> ImitationPool:
    """Curated experience to start RL's imitation update with: the run's successful expert
    demonstrations that the safety judge passes (a naive expert's unsafe ones stay out)."""
    pool = ImitationPool(
        learner.policy.max_positions, ctx.config.sft.balance == "sequence", own=ctx.config.rl.imitation_own
    )
    demos = await demonstrations(ctx, learner, ctx.state.run_id)
    judged = ctx.config.rl.imitation_judged
    kept, left_out = curated(demos, lambda t: bool(ctx.judge.judge(t).unsafe), judged)
    pool.add_demos(demo_sequences(ctx, learner, kept), {t.id: t.task.env_id for t in kept})
    if judged:
        ctx.log(f"[{learner.name}] imitation pool: {pool.demos} safe demonstrations ({left_out} unsafe ones left out)")
    else:
        ctx.log(f"[{learner.name}] imitation pool: {pool.demos} demonstrations, unsafe ones included (not judged)")
    return pool
