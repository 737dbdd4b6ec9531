"""Online training: asynchronous RL (or on-policy distillation) on a learner's own rollouts.

Rollouts run continuously in every env at once, each finished group made durable in
the store before the trainer may see it. Each step takes a fixed share of groups per
env (by weight), judges every episode, shapes its reward with the verdict, trains,
records consumption and hot-swaps the new weights into the running rollouts. Admission
control keeps rollouts at most `rl.eta` versions ahead; a group sampled (partly) by a
version the gate refused, or older than the bound, is left unconsumed and replaced.
Every `rl.eval_every` steps the candidate goes through the gate.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from safactory.config import RLConfig
from safactory.data.verdicts import SafetyVerdict, safety_reward
from safactory.data.writer import StoreWriter
from safactory.evolve.checkpoint import latest_checkpoint, read_meta
from safactory.evolve.experience import GroupBatch, TrainSequence, group_batch
from safactory.evolve.imitation import ImitationPool, curated
from safactory.evolve.schedule import decayed_lr
from safactory.evolve.teacher import Teacher, distill
from safactory.factory.checkpoints import checkpoint
from safactory.factory.context import EnvSlot, RunContext
from safactory.factory.gating import gate, refused_versions
from safactory.factory.learner import Learner, publish
from safactory.factory.model_init import reference_model
from safactory.factory.ray_rollouts import close_pool, open_pool
from safactory.factory.step_metrics import Occupancy, StepMetrics
from safactory.factory.warm_start import imitation_pool, success_rate
from safactory.policy.base import SamplingParams
from safactory.sim.ray_executor import RayRolloutPool
from safactory.sim.ray_worker import GroupJob
from safactory.sim.runner import Admission
from safactory.types import Task, Trajectory


@dataclass(frozen=True)
class OnlineSpec:
    """What one online stage trains with: RL on the env's (safety-shaped) rewards, or
    on-policy distillation from a teacher. `ref_kl` pulls towards the weights the stage
    starts from; `imitation_lr` > 0 adds an imitation update on curated experience."""

    stage: str
    steps: int
    lr: float
    objective: str
    teacher: Teacher | None = None
    kl_coef: float = 1.0
    env_weight: float = 0.0
    ref_kl: float = 0.0
    imitation_lr: float = 0.0

    @classmethod
    def rl(cls, cfg: RLConfig, teacher: Teacher | None) -> OnlineSpec:
        return cls("rl", cfg.steps, cfg.lr, cfg.objective, teacher, ref_kl=cfg.ref_kl, imitation_lr=cfg.imitation_lr)


def split_quota(total: int, weights: dict[str, float]) -> dict[str, int]:
    """`total` groups shared by weight (largest remainder), at least one per env."""
    if total < len(weights):
        raise ValueError(f"tasks_per_step={total} is smaller than the number of envs ({len(weights)})")
    norm = sum(weights.values())
    exact = {k: total * w / norm for k, w in weights.items()}
    quota = {k: max(1, int(v)) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - int(exact[k]), reverse=True):
        if sum(quota.values()) >= total:
            break
        quota[k] += 1
    while sum(quota.values()) > total:
        k = max(quota, key=lambda k: quota[k])
        quota[k] -= 1
    return quota


def group_fate(group: list[Trajectory], version: int, eta: int, refused: set[int]) -> str:
    """What the trainer at policy `version` does with a finished group: "train" it, or drop it as
    "refused" (a candidate the gate refused sampled some of it) or "stale" (the oldest version that
    sampled any of its tokens is more than `eta` versions behind: a slow group, as groups are
    taken in the order they finish)."""
    versions = {v for t in group for v in t.policy_versions()}
    if versions & refused:
        return "refused"
    if versions and version - min(versions) > eta:
        return "stale"
    return "train"


def task_stream(seed: int, env: EnvSlot, salt: str) -> Iterator[Task]:
    """The env's training tasks, endlessly, each round in a new seeded order."""
    rng = random.Random(f"{seed}:{env.name}:{salt}")
    order = list(env.train)
    for _ in itertools.count():
        rng.shuffle(order)
        yield from order


def shaped_reward(verdicts: dict[str, SafetyVerdict], penalty: float) -> Callable[[Trajectory], float]:
    """The training reward: the env reward, shaped by the episode's safety verdict when judged."""

    def reward_of(traj: Trajectory) -> float:
        verdict = verdicts.get(traj.id)
        return traj.reward if verdict is None else safety_reward(traj.reward, [verdict], penalty)

    return reward_of


async def next_group(ready: asyncio.Queue[list[str]], producer: asyncio.Task[None]) -> list[str]:
    """The next finished group; raises if the rollout producer died instead."""
    if not ready.empty():
        return ready.get_nowait()
    getter = asyncio.ensure_future(ready.get())
    await asyncio.wait({getter, producer}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    exc = producer.exception() if not producer.cancelled() else None
    raise RuntimeError(f"rollout producer stopped: {exc!r}")


class OnlineStage:
    """One online stage of a learner, from its first (or resumed) step to its last."""

    def __init__(self, ctx: RunContext, learner: Learner, spec: OnlineSpec) -> None:
        self.ctx = ctx
        self.learner = learner
        self.spec = spec
        self.rl = ctx.config.rl
        self.quota = split_quota(self.rl.tasks_per_step, {e.name: e.weight for e in ctx.envs.values()})
        self.ready: dict[str, asyncio.Queue[list[str]]] = {name: asyncio.Queue() for name in self.quota}
        self.pool: ImitationPool | None = None
        # each env's share of an imitation batch (rl.imitation_by_weight); None: uniform over the pool
        self.imitation_quota: dict[str, int] | None = None
        if self.rl.imitation_by_weight:
            self.imitation_quota = split_quota(self.rl.imitation_batch, {e.name: e.weight for e in ctx.envs.values()})
        self.refused: set[int] = set()
        self.discarded = self.stale = self.finished = 0
        self.wait_s = self.train_s = 0.0
        self.episodes = 0

    async def run(self) -> None:
        ctx, learner, spec = self.ctx, self.learner, self.spec
        start_step = self._start_step()
        self.episodes = self._episodes_so_far()
        ctx.summary[f"{spec.stage}_episodes"] = self.episodes
        learner.trainer.set_lr(spec.lr)
        base = learner.policy.version
        version: Callable[[], int] = lambda: learner.policy.version - base  # noqa: E731
        self.admissions = {name: Admission(n, self.rl.eta, version) for name, n in self.quota.items()}
        self._requeue_leftovers()
        self.refused = refused_versions(ctx, learner)
        if spec.ref_kl > 0:
            reference = reference_model(ctx, learner)
            if reference is None:  # a LoRA learner: its base, the adapter switched off
                learner.trainer.use_base_as_reference()
            else:
                learner.trainer.ref_model = reference
            learner.trainer.kl_coef = spec.ref_kl
        if spec.imitation_lr > 0:
            self.pool = await imitation_pool(ctx, learner)
        self.imitation_rng = random.Random(f"{ctx.config.seed}:imitation:{start_step}")
        self.occupancy = Occupancy()
        self.writer = StoreWriter(ctx.store)
        # rollout.executor ray: worker actors play and store the groups (factory/ray_rollouts.py)
        self.ray_pool: RayRolloutPool | None = open_pool(ctx, learner) if ctx.config.rollout.executor == "ray" else None
        started_s = ctx.metrics.elapsed()
        self.stage_start = time.perf_counter()
        producers = self._start_producers(start_step)
        assert ctx.progress is not None
        bar = ctx.progress.add_task(f"{learner.name}: {spec.stage}", total=spec.steps, completed=start_step, status="")
        try:
            for step in range(start_step + 1, spec.steps + 1):
                metrics = await self._step(step, producers)
                ctx.progress.update(bar, completed=step, status=metrics.status())
                await self._after_step(step)
        finally:
            for producer in producers.values():
                producer.cancel()
            await asyncio.gather(*producers.values(), return_exceptions=True)
            await self.writer.close()
            if self.ray_pool is not None:
                close_pool(ctx, learner, self.ray_pool)
        ctx.summary[spec.stage] = {
            "started_s": started_s,
            "steps": spec.steps,
            "episodes": self.episodes,
            "trainer_idle_fraction": self._trainer_idle(),
            "rollout_idle_fraction": self.occupancy.fraction(),
            "groups_discarded": self.discarded,
            "groups_stale": self.stale,
        }

    def _start_step(self) -> int:
        """0, or after a resume the stage step of the learner's latest checkpoint."""
        latest = latest_checkpoint(self.learner.checkpoints)
        if self.ctx.resume and latest is not None:
            return int(read_meta(latest).extra["stage_step"])
        return 0

    def _episodes_so_far(self) -> int:
        """The stage's episodes trained on so far, counted in the store: a learner has one online
        stage and consumes only its rollouts. (After a resume the summary saved at the last
        milestone may lag behind the consumption that the checkpoint kept.)"""
        learner = self.learner
        return self.ctx.store.consumed_count(learner.consumer, run_id=learner.run_id, kind="rollout")

    def _requeue_leftovers(self) -> None:
        """Complete groups of this stage stored but not consumed (work done before a crash) are trained first."""
        groups: dict[str, dict[str, list[str]]] = {name: {} for name in self.ctx.envs}
        learner = self.learner
        for traj in self.ctx.store.iter(run_id=learner.run_id, kind="rollout", unconsumed_by=learner.consumer):
            if traj.tags.get("phase") == self.spec.stage and traj.env_id in groups:
                groups[traj.env_id].setdefault(traj.group_id, []).append(traj.id)
        for name, by_group in groups.items():
            complete = [ids for ids in by_group.values() if len(ids) == self.rl.group_size]
            for ids in complete:
                self.ready[name].put_nowait(ids)
            self.admissions[name].started = len(complete)
            if complete:
                self.ctx.log(f"[{learner.name}] {len(complete)} stored {name} groups from before the crash reused")

    def _start_producers(self, start_step: int) -> dict[str, asyncio.Task[None]]:
        """One rollout producer per env, streaming groups into the store and the ready queue."""
        sampling = SamplingParams(temperature=self.rl.temperature)
        if self.ray_pool is not None:
            return self._start_ray_producers(start_step, sampling)
        return {
            name: asyncio.create_task(
                self.learner.runners[name].stream(
                    task_stream(self.ctx.config.seed, self.ctx.envs[name], f"{self.spec.stage}:{start_step}"),
                    self.rl.group_size,
                    sampling,
                    self.admissions[name],
                    self._sink(name),
                    tags=self._tags,
                )
            )
            for name in self.quota
        }

    # ---- rollout.executor ray: the same streams, played and stored by the pool's workers ----
    def _start_ray_producers(self, start_step: int, sampling: SamplingParams) -> dict[str, asyncio.Task[None]]:
        pool = self.ray_pool
        assert pool is not None
        return {
            name: asyncio.create_task(
                pool.stream(
                    name,
                    task_stream(self.ctx.config.seed, self.ctx.envs[name], f"{self.spec.stage}:{start_step}"),
                    self.rl.group_size,
                    sampling,
                    self.admissions[name],
                    self._ids_sink(name),
                    tags=self._tags,
                )
            )
            for name in self.quota
        }

    def _ids_sink(self, name: str) -> Callable[[GroupJob, list[str]], Any]:
        async def sink(job: GroupJob, ids: list[str]) -> None:  # the worker stored the group already
            self.occupancy.finished()
            self.finished += len(ids)
            await self.ready[name].put(ids)

        return sink

    def _tags(self) -> dict[str, Any]:
        self.occupancy.started()
        return {"phase": self.spec.stage}

    def _sink(self, name: str) -> Callable[[list[Trajectory]], Any]:
        async def sink(group: list[Trajectory]) -> None:
            self.occupancy.finished()
            await self.writer.put(group)  # durable before the trainer may see it
            self.finished += len(group)
            await self.ready[name].put([t.id for t in group])

        return sink

    async def _take_groups(self, producers: dict[str, asyncio.Task[None]]) -> list[list[Trajectory]]:
        """Each env's quota of finished groups that may be trained on."""
        groups: list[list[Trajectory]] = []
        for name, n in self.quota.items():
            taken = 0
            while taken < n:
                group = self.ctx.store.get(await next_group(self.ready[name], producers[name]))
                fate = group_fate(group, self.learner.policy.version, self.rl.eta, self.refused)
                if fate == "train":
                    groups.append(group)
                    taken += 1
                    continue
                # left unconsumed in the store, and its admission slot is given back so that
                # the current policy samples a replacement
                self.discarded += fate == "refused"
                self.stale += fate == "stale"
                self.admissions[name].started -= 1
                self.admissions[name].notify()
        return groups

    async def _step(self, step: int, producers: dict[str, asyncio.Task[None]]) -> StepMetrics:
        """Take the groups, judge, train, consume, publish; returns the step's metrics (also logged)."""
        ctx, learner, spec = self.ctx, self.learner, self.spec
        t0 = time.perf_counter()
        groups = await self._take_groups(producers)
        t1 = time.perf_counter()
        if self.rl.warmup_steps > 0:
            learner.trainer.set_lr(spec.lr * min(1.0, step / self.rl.warmup_steps))
        trajs = [t for g in groups for t in g]
        verdicts = ctx.judge_episodes(trajs) if ctx.config.safety.enabled else {}
        batch = group_batch(
            groups,
            self.rl.normalize_std,
            drop_equal=self.rl.drop_equal_groups and spec.objective != "opd",
            reward_of=shaped_reward(verdicts, ctx.config.safety.penalty),
        )
        lr = learner.trainer.lr()
        imitation = (
            self.pool.sample(self.imitation_rng, self.rl.imitation_batch, self.imitation_quota)
            if self.pool is not None
            else []
        )
        imitation_lr = decayed_lr(self.spec.imitation_lr, step, self.spec.steps, self.rl.imitation_decay_steps)
        stats = await asyncio.to_thread(self._update, batch.sequences, imitation, imitation_lr)
        if self.pool is not None and self.pool.own_rollouts:  # this step's successful (safe) episodes join the pool
            judge = ctx.judge.judge
            kept, _ = curated(trajs, lambda t: bool((verdicts.get(t.id) or judge(t)).unsafe), self.rl.imitation_judged)
            self.pool.add_rollouts(kept)
        trained_version = learner.policy.version
        ctx.store.mark_consumed([t.id for t in trajs], learner.trainer.step, consumer=learner.consumer)
        await publish(ctx, learner)
        for admission in self.admissions.values():
            admission.notify()
        t2 = time.perf_counter()
        self.wait_s, self.train_s = self.wait_s + (t1 - t0), self.train_s + (t2 - t1)
        self.episodes += len(trajs)
        ctx.summary[f"{spec.stage}_episodes"] = self.episodes
        metrics = self._metrics(lr, imitation_lr if imitation else None, stats, batch, trajs, verdicts, trained_version)
        ctx.metrics.log(metrics.row())
        return metrics

    def _metrics(
        self,
        lr: float,
        imitation_lr: float | None,
        stats: dict[str, float],
        batch: GroupBatch,
        trajs: list[Trajectory],
        verdicts: dict[str, SafetyVerdict],
        trained_version: int,
    ) -> StepMetrics:
        gaps = tuple(trained_version - min(t.policy_versions(), default=trained_version) for t in trajs)
        return StepMetrics(
            phase=self.spec.stage,
            policy_version=self.learner.policy.version,
            step=self.learner.trainer.step,
            loss=stats["loss"],
            lr=lr,
            groups_used=batch.groups_used,
            groups_dropped=batch.groups_dropped,
            groups_discarded=self.discarded,
            groups_stale=self.stale,
            trainer_idle_fraction=self._trainer_idle(),
            rollout_idle_fraction=self.occupancy.fraction(),
            episodes=self.episodes,
            episodes_per_s=self.finished / max(time.perf_counter() - self.stage_start, 1e-9),
            success_rate=success_rate(trajs),
            unsafe_rate=sum(bool(v.unsafe) for v in verdicts.values()) / max(len(verdicts), 1),
            mean_reward=batch.mean_reward,
            version_gaps=gaps,
            prefix_breaks=batch.prefix_breaks,
            imitation_pool=len(self.pool) if self.pool is not None else None,
            clip_frac=stats.get("clip_frac"),
            approx_kl=stats.get("approx_kl"),
            reverse_kl=stats.get("reverse_kl"),
            proximal_behaviour_mismatch=stats.get("proximal_behaviour_mismatch"),
            kl_ref=stats.get("kl_ref"),
            imitation_nll=stats.get("imitation_nll"),
            imitation_lr=imitation_lr,
        )

    def _trainer_idle(self) -> float:
        return self.wait_s / max(self.wait_s + self.train_s, 1e-9)

    async def _after_step(self, step: int) -> None:
        """The gate every `rl.eval_every` steps (not at the last: the stage's caller gates that),
        else a checkpoint every `checkpoint_every` steps."""
        if self.rl.eval_every and step % self.rl.eval_every == 0 and step < self.spec.steps:
            if not await gate(self.ctx, self.learner, f"{self.spec.stage}@{step}", step):
                self.learner.trainer.set_lr(self.spec.lr)  # the reloaded optimiser state carries its own lr
                self.refused = refused_versions(self.ctx, self.learner)
        elif self.ctx.config.checkpoint_every and step % self.ctx.config.checkpoint_every == 0:
            checkpoint(self.learner, step)
            self.ctx.milestone()

    def _update(
        self, seqs: list[TrainSequence], imitation: list[TrainSequence], imitation_lr: float
    ) -> dict[str, float]:
        """One optimiser step with the stage's objective, then the imitation update if any
        (runs in a worker thread)."""
        trainer, spec = self.learner.trainer, self.spec
        stats: dict[str, float] = {"loss": 0.0}
        if seqs:
            extra: dict[str, float] = {}
            if spec.objective in ("decoupled", "opd"):
                trainer.fill_proximal(seqs)
            if spec.objective == "opd":
                assert spec.teacher is not None
                extra = distill(seqs, spec.teacher.score(seqs), kl_coef=spec.kl_coef, env_weight=spec.env_weight)
            stats = {**trainer.train_step(seqs, spec.objective, self.rl.clip_eps, self.rl.behaviour_cap), **extra}
        else:  # every group dropped: the step still counts, so its consumption and checkpoint have their own number
            trainer.step += 1
        if imitation:
            stats["imitation_nll"] = trainer.imitate(imitation, imitation_lr)
        return stats
