"""The closed loop (the Factory): simulate -> store -> train -> redeploy, phase by phase.

Phases of the walking skeleton:
  init  held-out evaluation of the fresh model;
  sft   expert demonstrations are collected through the same runner, stored, read
        back from the store and used for a supervised warm start;
  rl    GRPO on the policy's own rollouts. Rollouts keep running while the trainer
        trains (bounded by the staleness bound eta); every step's groups are read
        back from the store, their consumption is recorded, and the new weights are
        hot-swapped into the running policy as version + 1.
Each phase ends with a greedy evaluation on held-out tasks; all of it lands in the
run directory (store.db, metrics.jsonl, summary.json, config.yaml, model/).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from safactory.config import RunConfig, save_config
from safactory.data.experience import TrainSequence, group_batch, sft_sequence
from safactory.data.integrity import code_version, weights_hash
from safactory.data.store import TrajectoryStore
from safactory.data.writer import StoreWriter
from safactory.evolve.teacher import LocalTeacher, distill
from safactory.evolve.trainer import Trainer
from safactory.metrics import MetricsLog
from safactory.policy.base import SamplingParams
from safactory.policy.chat import PlainTextChat
from safactory.policy.local import LocalPolicy
from safactory.policy.models import TinyModelSpec, build_tiny, load_model, save_model
from safactory.sim.agent import EpisodeLimits
from safactory.sim.env import EnvEntry, default_registry
from safactory.sim.runner import Admission, RolloutRunner
from safactory.types import Task, Trajectory, uuid7

GREEDY = SamplingParams(temperature=0.0)


def success_rate(trajs: list[Trajectory]) -> float:
    return sum(t.success for t in trajs) / len(trajs) if trajs else 0.0


class Factory:
    """Runs one configured closed loop into an output directory."""

    def __init__(self, config: RunConfig, out_dir: Path, console: Console | None = None) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.console = console or Console(stderr=True)
        self.summary: dict[str, Any] = {"phases": {}}

    def run(self) -> dict[str, Any]:
        return asyncio.run(self._run())

    # ---- set-up ------------------------------------------------------------------------
    async def _run(self) -> dict[str, Any]:
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out)
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        if cfg.model.path:
            model, self.tokenizer = load_model(cfg.model.path)
        elif cfg.model.kind == "tiny":
            spec = TinyModelSpec(cfg.model.hidden_size, cfg.model.layers, cfg.model.heads, cfg.model.intermediate_size)
            model, self.tokenizer = build_tiny(spec, cfg.seed)
        else:
            raise ValueError(f"model kind {cfg.model.kind!r} is not supported by `run` yet; use 'tiny' or model.path")
        model = model.to(cfg.model.torch_device())
        self.chat = PlainTextChat(self.tokenizer)
        self.policy = LocalPolicy(copy.deepcopy(model), self.chat, max_batch=cfg.rollout.max_batch, seed=cfg.seed)
        self.trainer = Trainer(model, lr=cfg.sft.lr, pad_id=self.tokenizer.pad_id)
        self.store = TrajectoryStore(cfg.store_url) if cfg.store_url else TrajectoryStore.in_dir(self.out)
        self.run_id = f"{cfg.name}-{uuid7()}"
        self.code_version = code_version()
        self.config_hash = cfg.hash()
        self.store.create_run(self.run_id, cfg.model_dump(mode="json"), self.code_version)
        self.weights_hashes: dict[int, str] = {}
        self._record_version(self.policy.model.state_dict(), parent=None)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.entry: EnvEntry = default_registry().get(cfg.env.id)
        source = self.entry.tasks(**cfg.env.options)
        self.train_tasks: list[Task] = source.tasks("train", cfg.env.train_tasks)
        self.test_tasks: list[Task] = source.tasks("test", cfg.env.test_tasks)
        self.limits = EpisodeLimits(
            max_turns=cfg.rollout.max_turns,
            max_tokens_per_turn=cfg.rollout.max_tokens_per_turn,
            timeout_s=cfg.rollout.timeout_s,
        )
        self.runner = self._runner(self.policy)
        self.episodes = 0
        self.summary["run_id"] = self.run_id
        try:
            with self._progress() as self.progress:
                await self._phases()
        finally:
            await self.policy.close()
            self.metrics.close()
            self.store.close()
        save_model(self.policy.model, self.tokenizer, self.out / "model")
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2))
        self._print_table()
        return self.summary

    def _runner(self, policy: Any) -> RolloutRunner:
        return RolloutRunner(
            self.entry.factory,
            policy,
            limits=self.limits,
            concurrency=self.config.rollout.concurrency,
            run_id=self.run_id,
            seed=self.config.seed,
            provenance=self._provenance,
        )

    def _provenance(self) -> dict[str, Any]:
        """Stamped on every trajectory at episode start."""
        version = self.policy.version
        return {
            "config_hash": self.config_hash,
            "code_version": self.code_version,
            "policy_version_at_start": version,
            "weights_hash": self.weights_hashes.get(version, ""),
        }

    def _record_version(self, state_dict: dict[str, torch.Tensor], parent: int | None) -> None:
        """Register the policy's current version (weights hash, parent, training step) in the store."""
        version = self.policy.version
        self.weights_hashes[version] = weights_hash(state_dict)
        self.store.add_checkpoint(
            self.run_id,
            version,
            weights_hash=self.weights_hashes[version],
            train_step=self.trainer.step,
            parent_version=parent,
        )

    async def _publish(self) -> int:
        """Hot-swap the trainer's weights into the running policy as the next version."""
        weights = self.trainer.weights()
        parent = self.policy.version
        await self.policy.publish(weights)
        self._record_version(weights, parent)
        return self.policy.version

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
        )

    async def _phases(self) -> None:
        await self._evaluate("init")
        if self.config.sft.enabled:
            await self._sft()
            await self._evaluate("sft")
        if self.config.rl.enabled:
            await self._rl()
            await self._evaluate("rl")

    # ---- evaluation --------------------------------------------------------------------
    async def _evaluate(self, phase: str) -> float:
        trajs = await self._greedy(self.test_tasks, {"phase": phase})
        rate = success_rate(trajs)
        row = {
            "success_rate": rate,
            "episodes": len(trajs),
            "policy_version": self.policy.version,
            "time_s": round(time.time() - self.metrics.start, 3),
            "rl_episodes": self.episodes,
        }
        if "@" in phase:  # intermediate evaluations during a phase
            self.summary.setdefault("evals", {})[phase] = row
        else:
            self.summary["phases"][phase] = row
        self.metrics.log({"policy_version": self.policy.version, "eval/success_rate": rate, "eval/phase": phase})
        self.console.log(f"held-out success after {phase}: {rate:.3f} (policy v{self.policy.version})")
        return rate

    async def _greedy(self, tasks: list[Task], tags: dict[str, Any]) -> list[Trajectory]:
        groups = await self.runner.run_groups(tasks, 1, GREEDY, kind="eval", tags=tags)
        trajs = [t for g in groups for t in g]
        self.store.add(trajs)
        return trajs

    # ---- warm start ------------------------------------------------------------------
    async def _sft(self) -> None:
        cfg = self.config.sft
        expert = self.entry.expert
        if expert is None:
            raise ValueError(f"environment {self.config.env.id!r} has no scripted expert for the warm start")
        demo_tasks = self.train_tasks[: cfg.demos]
        groups = await self._runner(expert()).run_groups(demo_tasks, 1, GREEDY, kind="expert", tags={"phase": "sft"})
        self.store.add([t for g in groups for t in g])
        demos = [t for t in self.store.query(run_id=self.run_id, kind="expert") if t.success]
        if not demos:
            raise RuntimeError("the expert solved none of the demonstration tasks; nothing to learn from")
        sequences = [sft_sequence(t, self.chat) for t in demos]
        self.console.log(f"warm start on {len(sequences)} expert demonstrations read back from the store")
        self.trainer.set_lr(cfg.lr)
        probe_tasks = self.train_tasks[: cfg.probe_tasks]
        bar = self.progress.add_task("sft", total=cfg.max_steps, status="")
        probe = 0.0
        for step in range(1, cfg.max_steps + 1):
            batch = self.rng.sample(sequences, min(cfg.batch_size, len(sequences)))
            stats = await asyncio.to_thread(self.trainer.train_step, batch, "sft")
            self.metrics.log({"phase": "sft", "train/step": self.trainer.step, "train/loss": stats["loss"]})
            self.progress.update(bar, completed=step, status=f"loss {stats['loss']:.3f}  probe {probe:.2f}")
            if step % cfg.probe_every == 0 or step == cfg.max_steps:
                await self._publish()
                probe = success_rate(await self._greedy(probe_tasks, {"phase": "sft_probe", "step": step}))
                self.metrics.log({"policy_version": self.policy.version, "sft/probe_success": probe})
                if probe >= cfg.target_success:
                    break
        self.progress.update(bar, total=step, completed=step, status=f"probe {probe:.2f} after {step} steps")
        self.summary["sft"] = {"steps": step, "demos": len(sequences), "probe_success": probe}

    # ---- reinforcement learning ------------------------------------------------------
    def _task_stream(self) -> Iterator[Task]:
        order = list(self.train_tasks)
        for _ in itertools.count():
            self.rng.shuffle(order)
            yield from order

    async def _rl(self) -> None:
        cfg = self.config.rl
        self.trainer.set_lr(cfg.lr)
        self.teacher: LocalTeacher | None = None
        if cfg.objective == "opd":
            if not cfg.teacher:
                raise ValueError("rl.objective=opd needs rl.teacher (a saved model directory)")
            teacher_model, teacher_tok = load_model(cfg.teacher)
            teacher_model = teacher_model.to(next(self.trainer.model.parameters()).device)
            self.teacher = LocalTeacher(teacher_model, teacher_tok, self.tokenizer, pad_id=self.tokenizer.pad_id)
        rl_started_s = round(time.time() - self.metrics.start, 3)
        base = self.policy.version
        admission = Admission(cfg.tasks_per_step, cfg.eta, lambda: self.policy.version - base)
        ready: asyncio.Queue[list[str]] = asyncio.Queue()

        writer = StoreWriter(self.store)

        async def sink(group: list[Trajectory]) -> None:
            await writer.put(group)  # durable before the trainer may see it
            await ready.put([t.id for t in group])

        sampling = SamplingParams(temperature=cfg.temperature)
        producer = asyncio.create_task(
            self.runner.stream(
                self._task_stream(), cfg.group_size, sampling, admission, sink, tags=lambda: {"phase": "rl"}
            )
        )
        bar = self.progress.add_task("rl", total=cfg.steps, status="")
        wait_s = train_s = 0.0
        try:
            for step in range(1, cfg.steps + 1):
                t0 = time.perf_counter()
                id_groups = [await self._next_group(ready, producer) for _ in range(cfg.tasks_per_step)]
                t1 = time.perf_counter()
                if cfg.warmup_steps > 0:
                    self.trainer.set_lr(cfg.lr * min(1.0, step / cfg.warmup_steps))
                groups = [self.store.get(ids) for ids in id_groups]
                batch = group_batch(
                    groups, cfg.normalize_std, drop_equal=cfg.drop_equal_groups and cfg.objective != "opd"
                )
                stats: dict[str, float] = {"loss": 0.0}
                if batch.sequences:
                    stats = await asyncio.to_thread(self._rl_update, batch.sequences)
                trained_version = self.policy.version
                self.store.mark_consumed([i for ids in id_groups for i in ids], self.trainer.step, consumer=self.run_id)
                await self._publish()
                admission.notify()
                t2 = time.perf_counter()
                wait_s, train_s = wait_s + (t1 - t0), train_s + (t2 - t1)
                trajs = [t for g in groups for t in g]
                gaps = [trained_version - max(t.policy_versions(), default=trained_version) for t in trajs]
                self.episodes += len(trajs)
                rollout_success = success_rate(trajs)
                self.metrics.log(
                    {
                        "phase": "rl",
                        "policy_version": self.policy.version,
                        "train/step": self.trainer.step,
                        "train/loss": stats["loss"],
                        "train/clip_frac": stats.get("clip_frac"),
                        "train/approx_kl": stats.get("approx_kl"),
                        "train/reverse_kl": stats.get("reverse_kl"),
                        "train/proximal_behaviour_mismatch": stats.get("proximal_behaviour_mismatch"),
                        "train/groups_used": batch.groups_used,
                        "train/groups_dropped": batch.groups_dropped,
                        "train/idle_fraction": wait_s / max(wait_s + train_s, 1e-9),
                        "rollout/episodes": self.episodes,
                        "rollout/success_rate": rollout_success,
                        "rollout/mean_reward": batch.mean_reward,
                        "rollout/version_gap_max": max(gaps, default=0),
                        "rollout/version_gap_hist": {str(g): gaps.count(g) for g in sorted(set(gaps))},
                        "rollout/version_gap_mean": sum(gaps) / max(len(gaps), 1),
                    }
                )
                self.progress.update(
                    bar, completed=step, status=f"v{self.policy.version}  rollout success {rollout_success:.2f}"
                )
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    await self._evaluate(f"rl@{step}")
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            await writer.close()
        self.summary["rl"] = {
            "started_s": rl_started_s,
            "steps": cfg.steps,
            "episodes": self.episodes,
            "trainer_idle_fraction": wait_s / max(wait_s + train_s, 1e-9),
        }

    def _rl_update(self, seqs: list[TrainSequence]) -> dict[str, float]:
        """One RL optimiser step with the configured objective (runs in a worker thread)."""
        cfg = self.config.rl
        extra: dict[str, float] = {}
        if cfg.objective in ("decoupled", "opd"):
            self.trainer.fill_proximal(seqs)
        if cfg.objective == "opd":
            assert self.teacher is not None
            extra = distill(seqs, self.teacher.score(seqs), kl_coef=cfg.kl_coef, env_weight=cfg.env_weight)
        stats = self.trainer.train_step(seqs, cfg.objective, cfg.clip_eps, cfg.behaviour_cap)
        return {**stats, **extra}

    @staticmethod
    async def _next_group(ready: asyncio.Queue[list[str]], producer: asyncio.Task[None]) -> list[str]:
        """The next finished group; raises if the rollout producer died instead."""
        getter = asyncio.ensure_future(ready.get())
        await asyncio.wait({getter, producer}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        exc = producer.exception() if not producer.cancelled() else None
        raise RuntimeError(f"rollout producer stopped: {exc!r}")

    # ---- report ------------------------------------------------------------------------
    def _print_table(self) -> None:
        table = Table(title=f"held-out success ({self.config.env.id}, {self.config.env.test_tasks} tasks)")
        table.add_column("phase")
        table.add_column("success_rate", justify="right")
        table.add_column("policy_version", justify="right")
        for phase, row in self.summary["phases"].items():
            table.add_row(phase, f"{row['success_rate']:.3f}", str(row["policy_version"]))
        self.console.print(table)
        self.console.print(f"results in {self.out}")
