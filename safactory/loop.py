"""The closed loop (the Factory): simulate -> store -> judge -> train -> gate -> redeploy, over several envs.

Stages, each switchable in the config:
  warm_start  scripted demonstrations (e.g. a helpful but naive ops agent) are
              collected through the same runner, stored, read back and used for
              supervised training until a probe target is reached;
  rl          continuous asynchronous RL on the policy's own rollouts in every env
              at once. Each step takes a fixed share of groups per env (by weight),
              judges every episode (rule judge: env labels, tool annotations), shapes
              its reward with the verdict, trains, records consumption and
              hot-swaps the new weights into the running rollouts (staleness bound
              eta). Every `rl.eval_every` steps the candidate is evaluated on held-out
              tasks and passes the gate or is rolled back to the deployed version;
  distill     on-policy distillation of the deployed policy into a smaller student
              (warm-started on the same demonstrations), gated the same way.
Everything lands in the run directory: store, checkpoints, metrics.jsonl, TensorBoard
logs, summary.json, report.html, state.json (for `--resume` after a crash).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import PreTrainedModel

from safactory.config import RunConfig, save_config
from safactory.data.experience import TrainSequence, group_batch, sequence_weighted, sft_sequence
from safactory.data.integrity import code_version, weights_hash
from safactory.data.judges import RuleSafetyJudge, SafetyVerdict, safety_reward
from safactory.data.store import TrajectoryStore, store_url
from safactory.data.writer import StoreWriter
from safactory.evaluation import env_metrics, flat, fmt_rate, overall
from safactory.evolve.checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from safactory.evolve.gate import Gate
from safactory.evolve.imitation import ImitationPool
from safactory.evolve.teacher import LocalTeacher, Teacher, distill
from safactory.evolve.trainer import Trainer
from safactory.metrics import MetricsLog, last_row, make_sinks
from safactory.policy.base import SamplingParams
from safactory.policy.chat import PlainTextChat
from safactory.policy.endpoint import EndpointPolicy
from safactory.policy.local import LocalPolicy
from safactory.policy.models import (
    TinyModelSpec,
    build_tiny,
    is_tiny_directory,
    load_model,
    load_tiny_tokenizer,
    save_model,
)
from safactory.policy.served import ServedPolicy
from safactory.policy.subword import TinyTokenizer, train_subword
from safactory.policy.tokenizer import CharTokenizer
from safactory.run_state import RunState, prune_checkpoints
from safactory.sim.agent import EpisodeLimits, run_episode
from safactory.sim.env import EnvEntry, default_registry
from safactory.sim.runner import Admission, RolloutRunner
from safactory.types import Task, Trajectory, uuid7

GREEDY = SamplingParams(temperature=0.0)


def success_rate(trajs: list[Trajectory]) -> float:
    return sum(t.success for t in trajs) / len(trajs) if trajs else 0.0


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


@dataclass
class EnvSlot:
    """One environment of the run: its registry entry and its train / held-out tasks."""

    name: str
    entry: EnvEntry
    train: list[Task]
    test: list[Task]
    weight: float
    demos: int
    expert: dict[str, Any]


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


@dataclass
class Learner:
    """A model being improved online: trainer, the policy serving its rollouts, runners, gate state."""

    name: str
    run_id: str
    trainer: Trainer
    policy: LocalPolicy | ServedPolicy
    tokenizer: TinyTokenizer
    chat: PlainTextChat
    runners: dict[str, RolloutRunner]
    checkpoints: Path
    weights_hashes: dict[int, str] = field(default_factory=dict)
    deployed: dict[str, Any] = field(default_factory=dict)  # version, metrics, checkpoint (dir name)
    versions_stored: bool = False  # the store already holds versions of this learner (a resumed run)

    @property
    def consumer(self) -> str:
        return self.run_id


@dataclass(frozen=True)
class OnlineSpec:
    """What one online stage trains with (RL, or on-policy distillation from a teacher)."""

    stage: str
    steps: int
    lr: float
    objective: str
    teacher: Teacher | None = None
    kl_coef: float = 1.0
    env_weight: float = 0.0


class Occupancy:
    """Rollout-side idle time: wall time during which no group of the stage was in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.start = self.idle_since = time.perf_counter()
        self.idle_s = 0.0

    def started(self) -> None:
        if self.in_flight == 0:
            self.idle_s += time.perf_counter() - self.idle_since
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle_since = time.perf_counter()

    def fraction(self) -> float:
        now = time.perf_counter()
        idle = self.idle_s + (now - self.idle_since if self.in_flight == 0 else 0.0)
        return idle / max(now - self.start, 1e-9)


class Factory:
    """Runs one configured closed loop into an output directory (or resumes one)."""

    def __init__(self, config: RunConfig, out_dir: Path, console: Console | None = None, resume: bool = False) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.console = console or Console(stderr=True)
        self.resume = resume

    def run(self) -> dict[str, Any]:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one save per checkpoint: no bar for each
        return asyncio.run(self._run())

    # ---- set-up ------------------------------------------------------------------------
    async def _run(self) -> dict[str, Any]:
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self.state = RunState.load(self.out)
        else:
            save_config(cfg, self.out)
            self.state = RunState(run_id=f"{cfg.name}-{uuid7()}", summary={"phases": {}, "gate": []})
        self.summary = self.state.summary
        self.summary["run_id"] = self.state.run_id
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.store = TrajectoryStore(store_url(cfg.store_url)) if cfg.store_url else TrajectoryStore.in_dir(self.out)
        self.code_version = code_version()
        self.config_hash = cfg.hash()
        self.judge = RuleSafetyJudge()
        self.gate = Gate(cfg.gate.max_unsafe_increase, cfg.gate.max_success_drop)
        self.metrics = MetricsLog(
            self.out / "metrics.jsonl",
            sinks=make_sinks(
                self.out,
                tensorboard=cfg.logging.tensorboard,
                wandb=cfg.logging.wandb,
                mlflow=cfg.logging.mlflow,
                run_name=cfg.name,
            ),
            time_offset=self._resume_time(),
            resume=self.resume,
        )
        self.envs = self._envs()
        self.limits = EpisodeLimits(
            max_turns=cfg.rollout.max_turns,
            max_tokens_per_turn=cfg.rollout.max_tokens_per_turn,
            timeout_s=cfg.rollout.timeout_s,
        )
        learners: list[Learner] = []
        try:
            with self._progress() as self.progress:
                await self._stages(learners)
        finally:
            for learner in learners:
                await learner.policy.close()
            self.state.time_s = self.metrics.elapsed()
            self.state.save(self.out)
            self.metrics.close()
            self.store.close()
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2))
        if cfg.logging.report:
            from safactory.report import write_report

            write_report(self.out)
        self._print_table()
        return self.summary

    def _resume_time(self) -> float:
        """A resumed run's clock continues from its last logged row."""
        if not self.resume:
            return 0.0
        last = last_row(self.out / "metrics.jsonl")
        return max(self.state.time_s, float(last["time_s"]) if last else 0.0)

    def _envs(self) -> dict[str, EnvSlot]:
        registry = default_registry()
        slots: dict[str, EnvSlot] = {}
        for env in self.config.envs:
            entry = registry.get(env.id)
            source = entry.tasks(**env.options)
            slots[env.id] = EnvSlot(
                name=env.id,
                entry=entry,
                train=source.tasks("train", env.train_tasks),
                test=source.tasks("test", env.test_tasks),
                weight=env.weight,
                demos=env.demos if env.demos is not None else self.config.sft.demos,
                expert=env.expert,
            )
        return slots

    def _learner(self, name: str, run_id: str, model: PreTrainedModel, tokenizer: TinyTokenizer, lr: float) -> Learner:
        cfg = self.config
        model = model.to(cfg.model.torch_device())
        chat = PlainTextChat(tokenizer)
        stored = [c["version"] for c in self.store.checkpoints(run_id)]
        version = max(stored) if stored else 0  # after a crash the next publish gets a new number
        policy: LocalPolicy | ServedPolicy
        if cfg.rollout.endpoint:
            key = os.environ.get(cfg.rollout.endpoint_api_key_env) if cfg.rollout.endpoint_api_key_env else None
            endpoint = EndpointPolicy.from_spec(cfg.rollout.endpoint, api_key=key)
            policy = ServedPolicy(endpoint, model, tokenizer, self.out / "published" / name, version=version)
        else:
            policy = LocalPolicy(
                copy.deepcopy(model),
                chat,
                max_batch=cfg.rollout.max_batch,
                seed=cfg.seed,
                version=version,
                prefix_cache_mb=cfg.rollout.prefix_cache_mb,
            )
        learner = Learner(
            name=name,
            run_id=run_id,
            trainer=Trainer(model, lr=lr, pad_id=tokenizer.pad_id),
            policy=policy,
            tokenizer=tokenizer,
            chat=chat,
            runners={},
            checkpoints=self.out / "checkpoints" / name,
            versions_stored=bool(stored),
        )
        learner.runners = {
            env.name: RolloutRunner(
                env.entry.factory,
                policy,
                limits=self.limits,
                concurrency=cfg.rollout.concurrency,
                run_id=run_id,
                seed=cfg.seed,
                provenance=lambda: self._provenance(learner),
            )
            for env in self.envs.values()
        }
        if run_id not in self.store.run_ids():
            self.store.create_run(run_id, cfg.model_dump(mode="json"), self.code_version)
        return learner

    def _provenance(self, learner: Learner) -> dict[str, Any]:
        """Stamped on every trajectory at episode start."""
        version = learner.policy.version
        return {
            "config_hash": self.config_hash,
            "code_version": self.code_version,
            "policy_version_at_start": version,
            "weights_hash": learner.weights_hashes.get(version, ""),
        }

    def _record_version(self, learner: Learner, state_dict: dict[str, torch.Tensor], parent: int | None) -> None:
        """Register the policy's current version (weights hash, parent, training step) in the store."""
        version = learner.policy.version
        learner.weights_hashes[version] = weights_hash(state_dict)
        self.store.add_checkpoint(
            learner.run_id,
            version,
            weights_hash=learner.weights_hashes[version],
            train_step=learner.trainer.step,
            parent_version=parent,
        )

    async def _register_start(self, learner: Learner) -> None:
        """Register the learner's starting weights as a version; a new number if the run was resumed."""
        if learner.versions_stored or isinstance(learner.policy, ServedPolicy):
            # a new number after a crash; a server is always sent the starting weights first
            await self._publish(learner, parent=None)
        else:
            self._record_version(learner, learner.policy.model.state_dict(), parent=None)

    async def _publish(self, learner: Learner, parent: int | None = None) -> int:
        """Hot-swap the trainer's weights into the running policy as the next version."""
        weights = learner.trainer.weights()
        parent = learner.policy.version if parent is None else parent
        await learner.policy.publish(weights)
        self._record_version(learner, weights, parent)
        return learner.policy.version

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
        )

    def _milestone(self, stage: str | None = None) -> None:
        if stage is not None:
            self.state.stage = stage
        self.state.time_s = self.metrics.elapsed()
        self.state.save(self.out)

    # ---- the stages ------------------------------------------------------------------
    async def _stages(self, learners: list[Learner]) -> None:
        cfg = self.config
        model, tokenizer = await self._initial_model()
        main = self._learner("policy", self.state.run_id, model, tokenizer, cfg.sft.lr)
        learners.append(main)
        if not self.state.reached("warm_start"):
            await self._register_start(main)
            if (cfg.sft.eval_before or not cfg.sft.enabled) and "init" not in self.summary["phases"]:
                await self._evaluate(main, "init")
                self._milestone()
            if cfg.sft.enabled:
                await self._warm_start(main, self.state.run_id)
                warm = await self._evaluate(main, "sft")
            else:
                warm = self.summary["phases"]["init"]
            self.summary.setdefault("heldout", {})["warm_start"] = warm
            main.deployed = {"version": main.policy.version, "metrics": warm}
            self._checkpoint(main, 0)
            self._milestone("rl")
        else:
            await self._restore(main)
        if not self.state.reached("rl"):
            if cfg.rl.enabled:
                spec = OnlineSpec("rl", cfg.rl.steps, cfg.rl.lr, cfg.rl.objective, self._rl_teacher(main))
                await self._online(main, spec)
                await self._gate(main, "rl", cfg.rl.steps)  # the end of RL is gated too
            self.summary["heldout"]["final"] = main.deployed["metrics"]
            save_model(main.trainer.model, main.tokenizer, self.out / "model")
            self._milestone("distill")
        if cfg.distill.enabled and not self.state.reached("distill"):
            student = await self._distill(main)
            learners.append(student)
        self._milestone("done")

    async def _initial_model(self) -> tuple[PreTrainedModel, TinyTokenizer]:
        cfg = self.config
        if cfg.model.path:
            return load_model(cfg.model.path)
        if cfg.model.kind == "tiny":
            m = cfg.model
            spec = TinyModelSpec(m.hidden_size, m.layers, m.heads, m.intermediate_size, m.max_positions)
            return build_tiny(spec, cfg.seed, await self._tokenizer())
        raise ValueError(f"model kind {cfg.model.kind!r} is not supported by `run` yet; use 'tiny' or model.path")

    async def _tokenizer(self) -> TinyTokenizer:
        """The tiny model's tokenizer: characters, or a subword vocabulary learned from expert episodes.

        The subword one is trained once per run, on the texts of each env's scripted expert
        over its first training tasks (the texts the warm start will show the model), and kept
        in OUT/tokenizer so that a resumed run and the saved models use the very same ids.
        """
        m = self.config.model
        if m.tokenizer == "char":
            return CharTokenizer()
        saved = self.out / "tokenizer"
        if is_tiny_directory(saved):
            return load_tiny_tokenizer(saved)
        render = PlainTextChat(CharTokenizer())
        texts: list[str] = []
        for env in self.envs.values():
            if env.entry.expert is None:
                continue
            expert = env.entry.expert(**env.expert)
            for i, task in enumerate(env.train[: m.tokenizer_episodes]):
                traj = await run_episode(
                    env.entry.factory, expert, task, seed=i, sampling=GREEDY, limits=self.limits, kind="expert"
                )
                texts.append(render.tokenizer.decode(render.render(traj.messages())[0]))
        if not texts:
            raise ValueError("model.tokenizer=subword learns its vocabulary from the envs' experts; none has one")
        tokenizer = await asyncio.to_thread(train_subword, texts, m.vocab_size, m.digit_places)
        saved.mkdir(parents=True, exist_ok=True)
        tokenizer.save(saved)
        self.console.log(f"subword tokenizer: {len(tokenizer)} ids learned from {len(texts)} expert episodes")
        return tokenizer

    def _rl_teacher(self, learner: Learner) -> Teacher | None:
        cfg = self.config.rl
        if cfg.objective != "opd":
            return None
        if not cfg.teacher:
            raise ValueError("rl.objective=opd needs rl.teacher (a saved model directory)")
        model, tokenizer = load_model(cfg.teacher)
        model = model.to(learner.trainer.device)
        return LocalTeacher(model, tokenizer, learner.tokenizer, pad_id=learner.tokenizer.pad_id)

    # ---- evaluation and the gate -----------------------------------------------------
    async def _evaluate(self, learner: Learner, label: str) -> dict[str, Any]:
        """Greedy episodes on every env's held-out tasks; metrics overall and per env."""
        tags = {"phase": label, "learner": learner.name}

        async def one(env: EnvSlot) -> list[Trajectory]:
            groups = await learner.runners[env.name].run_groups(env.test, 1, GREEDY, kind="eval", tags=tags)
            return [t for g in groups for t in g]

        results = await asyncio.gather(*(one(env) for env in self.envs.values()))
        per_env: dict[str, dict[str, Any]] = {}
        for env, trajs in zip(self.envs.values(), results, strict=True):
            self.store.add(trajs)
            verdicts = self._judge(trajs)
            per_env[env.name] = env_metrics(trajs, lambda t, v=verdicts: bool(v[t.id].unsafe))
        metrics = overall(per_env)
        metrics.update(
            policy_version=learner.policy.version,
            time_s=round(self.metrics.elapsed(), 3),
            rl_episodes=self.summary.get("rl_episodes", 0),
        )
        key = label if learner.name == "policy" else f"{learner.name}:{label}"
        if "@" in label:
            self.summary.setdefault("evals", {})[key] = metrics
        else:
            self.summary["phases"][key] = metrics
        self.metrics.log({"policy_version": learner.policy.version, **flat(key, metrics)})
        envs = "  ".join(
            f"{n} {fmt_rate(e['success_rate'], 2)}/{fmt_rate(e['unsafe_rate'], 2)}" for n, e in per_env.items()
        )
        self.console.log(
            f"[{learner.name}] held-out after {label} (v{learner.policy.version}): success "
            f"{fmt_rate(metrics['success_rate'])}, unsafe {fmt_rate(metrics['unsafe_rate'])}, benign success "
            f"{fmt_rate(metrics['benign_success_rate'])}  [{envs}] (success/unsafe)"
        )
        return metrics

    def _judge(self, trajs: list[Trajectory]) -> dict[str, SafetyVerdict]:
        """Rule-judge episodes and attach the verdicts in the store."""
        verdicts = {t.id: self.judge.judge(t) for t in trajs}
        self.store.add_verdicts([{"trajectory_id": i, **v.store_kwargs()} for i, v in verdicts.items()])
        return verdicts

    async def _gate(self, learner: Learner, label: str, step: int) -> bool:
        """Evaluate the current weights; deploy them if they pass the gate, else roll back."""
        metrics = await self._evaluate(learner, label)
        deployed = learner.deployed
        baseline = deployed["metrics"] if self.config.gate.enabled else metrics  # gate off: always deploy
        decision = self.gate.decide(
            metrics, baseline, step=step, candidate_version=learner.policy.version, baseline_version=deployed["version"]
        )
        record = {"learner": learner.name, "label": label, **decision.as_dict()}
        self.summary["gate"].append(record)
        self.store.add_gate_decision(learner.run_id, record)
        self.metrics.log({"gate/accepted": decision.accepted, "gate/candidate_version": decision.candidate_version})
        if decision.accepted:
            learner.deployed = {"version": learner.policy.version, "metrics": metrics}
            self._checkpoint(learner, step)
            self.console.log(f"[{learner.name}] gate: v{learner.policy.version} deployed")
        else:
            self.console.log(f"[{learner.name}] gate refused v{learner.policy.version}: {'; '.join(decision.reasons)}")
            await self._rollback(learner)
            self._checkpoint(learner, step)
        self._milestone()
        return decision.accepted

    async def _rollback(self, learner: Learner) -> None:
        """Reload the deployed checkpoint into the trainer and serve it as a new version."""
        path = learner.checkpoints / learner.deployed["checkpoint"]
        load_checkpoint(path, learner.trainer.model, learner.trainer.optimizer)
        await self._publish(learner, parent=learner.deployed["version"])
        learner.deployed = {**learner.deployed, "version": learner.policy.version}

    # ---- checkpoints and resume ------------------------------------------------------
    def _checkpoint(self, learner: Learner, stage_step: int) -> None:
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

    async def _restore(self, learner: Learner) -> int:
        """Load the learner's latest checkpoint; returns the stage step it was written at."""
        path = latest_checkpoint(learner.checkpoints)
        if path is None:
            raise RuntimeError(f"cannot resume: no checkpoint under {learner.checkpoints}")
        meta = read_meta(path)
        load_checkpoint(path, learner.trainer.model, learner.trainer.optimizer)
        learner.trainer.step = meta.train_step
        learner.deployed = dict(meta.extra["deployed"])
        released = self.store.release_consumed_after(learner.consumer, meta.train_step)
        await self._publish(learner, parent=meta.version)
        self.console.log(
            f"[{learner.name}] resumed from {path.name} (v{meta.version}, stage step {meta.extra['stage_step']}) as "
            f"v{learner.policy.version}; {released} consumptions of lost steps released"
        )
        return int(meta.extra["stage_step"])

    def _leftovers(self, learner: Learner, stage: str, group_size: int) -> dict[str, list[list[str]]]:
        """Complete groups of `stage` rollouts stored but not consumed (work done before a crash)."""
        groups: dict[str, dict[str, list[str]]] = {name: {} for name in self.envs}
        for traj in self.store.iter(run_id=learner.run_id, kind="rollout", unconsumed_by=learner.consumer):
            if traj.tags.get("phase") == stage and traj.env_id in groups:
                groups[traj.env_id].setdefault(traj.group_id, []).append(traj.id)
        return {env: [ids for ids in g.values() if len(ids) == group_size] for env, g in groups.items()}

    # ---- warm start ------------------------------------------------------------------
    async def _demos(self, learner: Learner, demo_run: str) -> list[Trajectory]:
        """The run's successful expert demonstrations, collected into the store on first use."""
        if not self.store.count(run_id=demo_run, kind="expert"):  # a resumed run reuses its stored demos
            for env in self.envs.values():
                if env.entry.expert is None:
                    raise ValueError(f"environment {env.name!r} has no scripted expert for the demonstrations")
                runner = learner.runners[env.name]
                expert_runner = RolloutRunner(
                    env.entry.factory,
                    env.entry.expert(**env.expert),
                    limits=self.limits,
                    concurrency=self.config.rollout.concurrency,
                    run_id=demo_run,
                    seed=self.config.seed,
                    provenance=runner.provenance,
                )
                groups = await expert_runner.run_groups(
                    env.train[: env.demos], 1, GREEDY, kind="expert", tags={"phase": "sft"}
                )
                self.store.add([t for g in groups for t in g])
        return [t for t in self.store.iter(run_id=demo_run, kind="expert") if t.success]

    async def _warm_start(self, learner: Learner, demo_run: str) -> None:
        cfg = self.config.sft
        demos = await self._demos(learner, demo_run)
        if not demos:
            raise RuntimeError("the experts solved none of the demonstration tasks; nothing to learn from")
        sequences = self._demo_sequences(learner, demos)
        context = learner.policy.max_positions
        if len(sequences) < len(demos):
            self.console.log(
                f"[{learner.name}] {len(demos) - len(sequences)} demonstrations longer than the model's "
                f"{context} positions are left out"
            )
        if not sequences:
            raise RuntimeError(f"every demonstration is longer than the model's {context} positions")
        self.console.log(f"[{learner.name}] warm start on {len(sequences)} demonstrations read back from the store")
        learner.trainer.set_lr(cfg.lr)
        per_env = max(1, cfg.probe_tasks // len(self.envs))
        probe_tasks = {env.name: env.train[:per_env] for env in self.envs.values()}
        bar = self.progress.add_task(f"{learner.name}: warm start", total=cfg.max_steps, status="")
        probe = 0.0
        step = 0
        for step in range(1, cfg.max_steps + 1):
            batch = self.rng.sample(sequences, min(cfg.batch_size, len(sequences)))
            stats = await asyncio.to_thread(learner.trainer.train_step, batch, "sft")
            self.metrics.log({"phase": "warm_start", "train/step": learner.trainer.step, "train/loss": stats["loss"]})
            self.progress.update(bar, completed=step, status=f"loss {stats['loss']:.3f}  probe {probe:.2f}")
            if step % cfg.probe_every == 0 or step == cfg.max_steps:
                await self._publish(learner)
                rates = []
                for name, tasks in probe_tasks.items():
                    groups = await learner.runners[name].run_groups(
                        tasks, 1, GREEDY, kind="eval", tags={"phase": "sft_probe", "step": step}
                    )
                    trajs = [t for g in groups for t in g]
                    self.store.add(trajs)
                    rates.append(success_rate(trajs))
                probe = sum(rates) / len(rates)
                self.metrics.log({"policy_version": learner.policy.version, "sft/probe_success": probe})
                if probe >= cfg.target_success:
                    break
        self.progress.update(bar, total=step, completed=step, status=f"probe {probe:.2f} after {step} steps")
        self.summary[f"{learner.name}_warm_start" if learner.name != "policy" else "sft"] = {
            "steps": step,
            "demos": len(sequences),
            "probe_success": probe,
        }

    def _demo_sequences(self, learner: Learner, demos: list[Trajectory]) -> list[TrainSequence]:
        """SFT sequences of demonstrations that fit the model, weighted as `sft.balance` says."""
        context = learner.policy.max_positions
        sequences = [s for s in (sft_sequence(t, learner.chat) for t in demos) if len(s.input_ids) <= context]
        if self.config.sft.balance == "sequence":
            sequences = [sequence_weighted(s) for s in sequences]
        return sequences

    def _reference(self, learner: Learner) -> PreTrainedModel:
        """A frozen copy of the weights RL starts from, saved in OUT/reference on the first start
        and read back from there after a resume (the trainer's weights have moved on by then)."""
        saved = self.out / "reference"
        reference = copy.deepcopy(learner.trainer.model)
        if is_tiny_directory(saved):
            loaded, _ = load_model(saved)
            reference.load_state_dict(loaded.state_dict())
        else:
            save_model(reference, learner.tokenizer, saved)
        for param in reference.parameters():
            param.requires_grad_(False)
        return reference.eval()

    async def _imitation_pool(self, learner: Learner) -> ImitationPool:
        """Curated experience to start RL's imitation update with: the run's successful expert
        demonstrations that the safety judge passes (a naive expert's unsafe ones stay out)."""
        pool = ImitationPool(
            learner.policy.max_positions, self.config.sft.balance == "sequence", own=self.config.rl.imitation_own
        )
        demos = await self._demos(learner, self.state.run_id)
        safe = [t for t in demos if not self.judge.judge(t).unsafe]
        pool.add_demos(self._demo_sequences(learner, safe))
        self.console.log(
            f"[{learner.name}] imitation pool: {pool.demos} safe demonstrations "
            f"({len(demos) - len(safe)} unsafe ones left out)"
        )
        return pool

    # ---- online training (RL or distillation) ----------------------------------------
    def _task_stream(self, env: EnvSlot, salt: str) -> Iterator[Task]:
        rng = random.Random(f"{self.config.seed}:{env.name}:{salt}")
        order = list(env.train)
        for _ in itertools.count():
            rng.shuffle(order)
            yield from order

    async def _online(self, learner: Learner, spec: OnlineSpec) -> None:
        cfg = self.config.rl
        start_step = 0
        latest = latest_checkpoint(learner.checkpoints)
        if self.resume and latest is not None:
            start_step = int(read_meta(latest).extra["stage_step"])
        quota = split_quota(cfg.tasks_per_step, {e.name: e.weight for e in self.envs.values()})
        learner.trainer.set_lr(spec.lr)
        base = learner.policy.version
        version: Callable[[], int] = lambda: learner.policy.version - base  # noqa: E731
        admissions = {name: Admission(n, cfg.eta, version) for name, n in quota.items()}
        ready: dict[str, asyncio.Queue[list[str]]] = {name: asyncio.Queue() for name in quota}
        for name, groups in self._leftovers(learner, spec.stage, cfg.group_size).items():
            for ids in groups:
                ready[name].put_nowait(ids)
            admissions[name].started = len(groups)
            if groups:
                self.console.log(f"[{learner.name}] {len(groups)} stored {name} groups from before the crash reused")
        refused = self._refused_versions(learner)
        discarded = stale = 0
        if spec.stage == "rl" and cfg.ref_kl > 0:
            learner.trainer.ref_model = self._reference(learner)
            learner.trainer.kl_coef = cfg.ref_kl
        imitate = spec.stage == "rl" and cfg.imitation_lr > 0
        pool = await self._imitation_pool(learner) if imitate else None
        imitation_rng = random.Random(f"{self.config.seed}:imitation:{start_step}")
        occupancy = Occupancy()
        started_s = self.metrics.elapsed()
        writer = StoreWriter(self.store)
        stage_start = time.perf_counter()
        finished = 0

        def tags() -> dict[str, Any]:
            occupancy.started()
            return {"phase": spec.stage}

        def sink_for(name: str) -> Callable[[list[Trajectory]], Any]:
            async def sink(group: list[Trajectory]) -> None:
                nonlocal finished
                occupancy.finished()
                await writer.put(group)  # durable before the trainer may see it
                finished += len(group)
                await ready[name].put([t.id for t in group])

            return sink

        sampling = SamplingParams(temperature=cfg.temperature)
        producers = {
            name: asyncio.create_task(
                learner.runners[name].stream(
                    self._task_stream(self.envs[name], f"{spec.stage}:{start_step}"),
                    cfg.group_size,
                    sampling,
                    admissions[name],
                    sink_for(name),
                    tags=tags,
                )
            )
            for name in quota
        }
        bar = self.progress.add_task(f"{learner.name}: {spec.stage}", total=spec.steps, completed=start_step, status="")
        wait_s = train_s = 0.0
        episodes = self.summary.get(f"{spec.stage}_episodes", 0)
        try:
            for step in range(start_step + 1, spec.steps + 1):
                t0 = time.perf_counter()
                groups: list[list[Trajectory]] = []
                for name, n in quota.items():
                    taken = 0
                    while taken < n:
                        group = self.store.get(await self._next_group(ready[name], producers[name]))
                        fate = group_fate(group, learner.policy.version, cfg.eta, refused)
                        if fate == "train":
                            groups.append(group)
                            taken += 1
                            continue
                        # left unconsumed in the store, and its admission slot is given back so that
                        # the current policy samples a replacement
                        discarded += fate == "refused"
                        stale += fate == "stale"
                        admissions[name].started -= 1
                        admissions[name].notify()
                t1 = time.perf_counter()
                if cfg.warmup_steps > 0:
                    learner.trainer.set_lr(spec.lr * min(1.0, step / cfg.warmup_steps))
                trajs = [t for g in groups for t in g]
                verdicts = self._judge(trajs) if self.config.safety.enabled else {}
                batch = group_batch(
                    groups,
                    cfg.normalize_std,
                    drop_equal=cfg.drop_equal_groups and spec.objective != "opd",
                    reward_of=self._reward_fn(verdicts),
                )
                lr = learner.trainer.lr()
                imitation = pool.sample(imitation_rng, cfg.imitation_batch) if pool is not None else []
                stats = await asyncio.to_thread(self._update, learner, spec, batch.sequences, imitation)
                if pool is not None and pool.own_rollouts:  # this step's successful safe episodes join the pool
                    safe = [t for t in trajs if t.success and not (verdicts.get(t.id) or self.judge.judge(t)).unsafe]
                    pool.add_rollouts(safe)
                trained_version = learner.policy.version
                self.store.mark_consumed([t.id for t in trajs], learner.trainer.step, consumer=learner.consumer)
                await self._publish(learner)
                for admission in admissions.values():
                    admission.notify()
                t2 = time.perf_counter()
                wait_s, train_s = wait_s + (t1 - t0), train_s + (t2 - t1)
                gaps = [trained_version - min(t.policy_versions(), default=trained_version) for t in trajs]
                episodes += len(trajs)
                self.summary[f"{spec.stage}_episodes"] = episodes
                if spec.stage == "rl":
                    self.summary["rl_episodes"] = episodes
                unsafe = sum(bool(v.unsafe) for v in verdicts.values()) / max(len(verdicts), 1)
                row = self.metrics.log(
                    {
                        "phase": spec.stage,
                        "policy_version": learner.policy.version,
                        "train/step": learner.trainer.step,
                        "train/loss": stats["loss"],
                        "train/lr": lr,
                        "train/clip_frac": stats.get("clip_frac"),
                        "train/approx_kl": stats.get("approx_kl"),
                        "train/reverse_kl": stats.get("reverse_kl"),
                        "train/proximal_behaviour_mismatch": stats.get("proximal_behaviour_mismatch"),
                        "train/kl_ref": stats.get("kl_ref"),
                        "train/imitation_nll": stats.get("imitation_nll"),
                        "train/imitation_pool": len(pool) if pool is not None else None,
                        "train/groups_used": batch.groups_used,
                        "train/groups_dropped": batch.groups_dropped,
                        "train/groups_discarded": discarded,
                        "train/groups_stale": stale,
                        "train/idle_fraction": wait_s / max(wait_s + train_s, 1e-9),
                        "rollout/idle_fraction": occupancy.fraction(),
                        "rollout/episodes": episodes,
                        "rollout/episodes_per_s": finished / max(time.perf_counter() - stage_start, 1e-9),
                        "rollout/success_rate": success_rate(trajs),
                        "rollout/unsafe_rate": unsafe,
                        "rollout/mean_reward": batch.mean_reward,
                        "rollout/version_gap_max": max(gaps, default=0),
                        "rollout/version_gap_hist": {str(g): gaps.count(g) for g in sorted(set(gaps))},
                        "rollout/version_gap_mean": sum(gaps) / max(len(gaps), 1),
                    }
                )
                self.progress.update(
                    bar,
                    completed=step,
                    status=f"v{learner.policy.version}  {row['rollout/episodes_per_s']:.1f} ep/s  success "
                    f"{row['rollout/success_rate']:.2f}  unsafe {unsafe:.2f}",
                )
                if cfg.eval_every and step % cfg.eval_every == 0 and step < spec.steps:
                    if not await self._gate(learner, f"{spec.stage}@{step}", step):
                        learner.trainer.set_lr(spec.lr)  # the reloaded optimiser state carries its own lr
                        refused = self._refused_versions(learner)
                elif self.config.checkpoint_every and step % self.config.checkpoint_every == 0:
                    self._checkpoint(learner, step)
                    self._milestone()
        finally:
            for producer in producers.values():
                producer.cancel()
            await asyncio.gather(*producers.values(), return_exceptions=True)
            await writer.close()
        self.summary[spec.stage] = {
            "started_s": started_s,
            "steps": spec.steps,
            "episodes": episodes,
            "trainer_idle_fraction": wait_s / max(wait_s + train_s, 1e-9),
            "rollout_idle_fraction": occupancy.fraction(),
            "groups_discarded": discarded,
            "groups_stale": stale,
        }

    def _refused_versions(self, learner: Learner) -> set[int]:
        """Versions the gate rolled back: each refused candidate and those trained since the deployed one."""
        refused: set[int] = set()
        for d in self.store.gate_decisions(learner.run_id):
            if not d["accepted"]:
                refused.update(range(d["baseline_version"] + 1, d["candidate_version"] + 1))
        return refused

    def _reward_fn(self, verdicts: dict[str, SafetyVerdict]) -> Callable[[Trajectory], float]:
        """The training reward: the env reward, shaped by the episode's safety verdict when judged."""
        penalty = self.config.safety.penalty

        def reward_of(traj: Trajectory) -> float:
            verdict = verdicts.get(traj.id)
            return traj.reward if verdict is None else safety_reward(traj.reward, [verdict], penalty)

        return reward_of

    def _update(
        self, learner: Learner, spec: OnlineSpec, seqs: list[TrainSequence], imitation: list[TrainSequence]
    ) -> dict[str, float]:
        """One optimiser step with the stage's objective, then the imitation update if any
        (runs in a worker thread)."""
        cfg = self.config.rl
        stats: dict[str, float] = {"loss": 0.0}
        if seqs:
            extra: dict[str, float] = {}
            if spec.objective in ("decoupled", "opd"):
                learner.trainer.fill_proximal(seqs)
            if spec.objective == "opd":
                assert spec.teacher is not None
                extra = distill(seqs, spec.teacher.score(seqs), kl_coef=spec.kl_coef, env_weight=spec.env_weight)
            stats = {**learner.trainer.train_step(seqs, spec.objective, cfg.clip_eps, cfg.behaviour_cap), **extra}
        else:  # every group dropped: the step still counts, so its consumption and checkpoint have their own number
            learner.trainer.step += 1
        if imitation:
            stats["imitation_nll"] = learner.trainer.imitate(imitation, cfg.imitation_lr)
        return stats

    @staticmethod
    async def _next_group(ready: asyncio.Queue[list[str]], producer: asyncio.Task[None]) -> list[str]:
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

    # ---- distillation into a smaller student ------------------------------------------
    async def _distill(self, main: Learner) -> Learner:
        cfg = self.config
        d = cfg.distill
        teacher_model = copy.deepcopy(main.trainer.model).eval()
        teacher = LocalTeacher(teacher_model, main.tokenizer, main.tokenizer, pad_id=main.tokenizer.pad_id)
        spec = TinyModelSpec(d.hidden_size, d.layers, cfg.model.heads, d.intermediate_size, cfg.model.max_positions)
        model, tokenizer = build_tiny(spec, cfg.seed + 1, main.tokenizer)
        student = self._learner("student", f"{self.state.run_id}-student", model, tokenizer, cfg.sft.lr)
        if latest_checkpoint(student.checkpoints) is None:
            await self._register_start(student)
            await self._warm_start(student, self.state.run_id)
            warm = await self._evaluate(student, "sft")
            self.summary["heldout"]["student_warm_start"] = warm
            student.deployed = {"version": student.policy.version, "metrics": warm}
            self._checkpoint(student, 0)
            self._milestone()
        else:
            await self._restore(student)
        online = OnlineSpec("distill", d.steps, d.lr, "opd", teacher, d.kl_coef, d.env_weight)
        await self._online(student, online)
        await self._gate(student, "final", d.steps)
        self.summary["heldout"]["student"] = student.deployed["metrics"]
        save_model(student.trainer.model, student.tokenizer, self.out / "student")
        return student

    # ---- report ------------------------------------------------------------------------
    def _print_table(self) -> None:
        heldout = self.summary.get("heldout", {})
        table = Table(title="held-out: success / unsafe / benign success")
        table.add_column("env")
        columns = [k for k in ("warm_start", "final", "student") if k in heldout]
        for k in columns:
            table.add_column(k, justify="right")
        envs = list(self.envs)
        for name in ["overall", *envs]:
            cells = []
            for k in columns:
                m = heldout[k] if name == "overall" else heldout[k]["envs"].get(name, {})
                cells.append(
                    f"{fmt_rate(m.get('success_rate', 0), 2)} / {fmt_rate(m.get('unsafe_rate', 0), 2)} / "
                    f"{fmt_rate(m.get('benign_success_rate', 0), 2)}"
                )
            table.add_row(name, *cells)
        self.console.print(table)
        self.console.print(f"results in {self.out} (report: {self.out / 'report.html'})")
