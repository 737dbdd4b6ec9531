"""The run context: what every stage of the closed loop shares, built once per run.

`open_context` reads the configuration once and builds the run state (new and saved at
once, or loaded for `--resume`), the store, the metrics log, the safety judge and the
environments with their train / held-out tasks. Stages take the context and read the config
section they own (`ctx.config.rl` in the RL step, `ctx.config.sft` in the warm start).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from safactory.config import EnvConfig, RunConfig, save_config
from safactory.data.judges import RuleSafetyJudge
from safactory.data.redact import Redactor
from safactory.data.risk_suites import load_risk_suite
from safactory.data.store import TrajectoryStore, store_url
from safactory.data.verdicts import SafetyVerdict
from safactory.factory.metrics import MetricsLog, last_row, make_sinks
from safactory.factory.run_state import STATE_FILE, RunState
from safactory.policy.base import SamplingParams
from safactory.provenance import code_version
from safactory.sim.agent import EpisodeLimits
from safactory.sim.env import EnvEntry, EnvRegistry, EnvSpec
from safactory.sim.envs.risk import ENV_ID as RISK_ENV_ID
from safactory.sim.envs.risk import RiskEnv
from safactory.sim.registry import default_registry
from safactory.types import Task, Trajectory, uuid7

GREEDY = SamplingParams(temperature=0.0)
CONFIG_FILES = ("config.yaml", "config.sha256")  # what `save_config` writes


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


@dataclass
class RunContext:
    """Everything the stages share: config, output directory, store, metrics, judge, envs, state."""

    config: RunConfig
    out: Path
    console: Console
    resume: bool
    state: RunState
    store: TrajectoryStore
    metrics: MetricsLog
    judge: RuleSafetyJudge
    envs: dict[str, EnvSlot]
    limits: EpisodeLimits
    rng: random.Random
    code_version: str
    config_hash: str
    progress: Progress | None = None

    @property
    def summary(self) -> dict[str, Any]:
        """The run's summary (what `summary.json` and `state.json` hold), filled in by the stages."""
        return self.state.summary

    def milestone(self, stage: str | None = None) -> None:
        """Save the run state (and the stage reached, when given) so that `--resume` continues from here."""
        if stage is not None:
            self.state.stage = stage
        self.state.time_s = self.metrics.elapsed()
        self.state.save(self.out)

    def log(self, text: str) -> None:
        """A console line as plain text: "[policy]" or a list of figures in brackets is not markup."""
        self.console.log(text, markup=False, _stack_offset=2)

    def judge_episodes(self, trajs: list[Trajectory]) -> dict[str, SafetyVerdict]:
        """Rule-judge episodes and attach the verdicts in the store."""
        verdicts = {t.id: self.judge.judge(t) for t in trajs}
        self.store.add_verdicts([{"trajectory_id": i, **v.store_kwargs()} for i, v in verdicts.items()])
        return verdicts

    def close(self) -> None:
        self.state.time_s = self.metrics.elapsed()
        self.state.save(self.out)
        self.metrics.close()
        self.store.close()


def open_context(config: RunConfig, out: Path, console: Console, resume: bool) -> RunContext:
    """Create (or, with `resume`, reopen) the run in `out` and everything its stages share."""
    out.mkdir(parents=True, exist_ok=True)
    state, resume = _run_state(config, out, console, resume)
    state.summary["run_id"] = state.run_id
    torch.manual_seed(config.seed)
    redactor = Redactor() if config.redact else None
    if config.store_url:
        store = TrajectoryStore(store_url(config.store_url), redactor=redactor)
    else:
        store = TrajectoryStore.in_dir(out, redactor=redactor)
    log = config.logging
    metrics = MetricsLog(
        out / "metrics.jsonl",
        sinks=make_sinks(out, tensorboard=log.tensorboard, wandb=log.wandb, mlflow=log.mlflow, run_name=config.name),
        time_offset=_resume_time(out, state) if resume else 0.0,
        resume=resume,
    )
    rollout = config.rollout
    return RunContext(
        config=config,
        out=out,
        console=console,
        resume=resume,
        state=state,
        store=store,
        metrics=metrics,
        judge=RuleSafetyJudge(),
        envs=build_envs(config, store),
        limits=EpisodeLimits(
            max_turns=rollout.max_turns, max_tokens_per_turn=rollout.max_tokens_per_turn, timeout_s=rollout.timeout_s
        ),
        rng=random.Random(config.seed),
        code_version=code_version(),
        config_hash=config.hash(),
    )


def _run_state(config: RunConfig, out: Path, console: Console, resume: bool) -> tuple[RunState, bool]:
    """The run's state, and whether the run is resumed.

    A new run saves its config and then its state first, before anything slow, so a directory
    holding a config holds a state too, unless a kill came between the two writes: resuming
    such a run (nothing else in its directory) starts it from the beginning."""
    if resume and not RunState.exists(out):
        leftovers = sorted(p.name for p in out.iterdir() if p.name not in CONFIG_FILES and not p.name.startswith("."))
        if leftovers:
            raise FileNotFoundError(
                f"{out} holds no {STATE_FILE} but holds {', '.join(leftovers)}: it stopped before saving its state and "
                f"cannot be continued; remove it (or choose another --out) and start the run again"
            )
        console.log(
            f"{out} holds no {STATE_FILE} (stopped as it began): starting it from the beginning with its config"
        )
        resume = False
    if resume:
        return RunState.load(out), True
    save_config(config, out)
    state = RunState(run_id=f"{config.name}-{uuid7()}", summary={"phases": {}, "gate": []})
    state.save(out)
    return state, False


def _resume_time(out: Path, state: RunState) -> float:
    """A resumed run's clock continues from its last logged row."""
    last = last_row(out / "metrics.jsonl")
    return max(state.time_s, float(last["time_s"]) if last else 0.0)


def build_envs(config: RunConfig, store: TrajectoryStore) -> dict[str, EnvSlot]:
    """The run's environments, each with its train and held-out tasks drawn once."""
    registry = default_registry()
    slots: dict[str, EnvSlot] = {}
    for env in config.envs:
        if env.id.startswith("risk:"):
            slots[env.id] = risk_slot(config, env, registry, store)
            continue
        entry = registry.get(env.id)
        source = entry.tasks(**env.options)
        slots[env.id] = EnvSlot(
            name=env.id,
            entry=entry,
            train=source.tasks("train", env.train_tasks),
            test=source.tasks("test", env.test_tasks),
            weight=env.weight,
            demos=env.demos if env.demos is not None else config.sft.demos,
            expert=env.expert,
        )
    return slots


def risk_slot(config: RunConfig, env: EnvConfig, registry: EnvRegistry, store: TrajectoryStore) -> EnvSlot:
    """A stored risk suite as an env (`risk:NAME`; `options: {db: URL}` when it is in another store): its
    `train` cases are trained on, its held-out ones only evaluated, so the gate also refuses a candidate
    that falls for more of them. Demonstrations come from the base env's expert, on the attacked tasks."""
    name = env.id.removeprefix("risk:")
    source = TrajectoryStore(store_url(env.options["db"])) if env.options.get("db") else store
    try:
        cases = load_risk_suite(source, name)
    finally:
        if source is not store:
            source.close()
    base = registry.get(str(cases[0].data["base_env"]))
    tools = base.spec.tools if base.spec is not None else ()
    entry = EnvEntry(
        factory=partial(RiskEnv, registry.get),
        tasks=list,
        expert=base.expert,
        spec=EnvSpec(
            id=RISK_ENV_ID, version="1", tools=tuple(tools), max_turns=base.spec.max_turns if base.spec else 16
        ),
    )
    return EnvSlot(
        name=env.id,
        entry=entry,
        train=[c for c in cases if c.split == "train"][: env.train_tasks],
        test=[c for c in cases if c.split == "test"][: env.test_tasks],
        weight=env.weight,
        demos=env.demos if env.demos is not None else config.sft.demos,
        expert=env.expert,
    )
