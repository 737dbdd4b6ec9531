"""`safactory eval`: one policy on a suite of environments, K attempts per task, metrics with intervals.

A suite is a named list of entries (env, task split, number of tasks, epochs, task options
such as an attack). Built in: `core` (held-out `arith` and `maze`) and `safety` (held-out
`ops`, with its injections and harmful requests); any YAML file holding such a list is a
suite too (`suite: NAME` and `entries: [{env, split, tasks, epochs, options}]`).

Every episode runs through the same runner as the loop and is stored (redacted unless
`raw`) as kind `eval`, tagged with the suite and the policy, in a run of its own. The
safety judge (env labels, tool annotations) says which episodes are unsafe. Metrics
(`safactory.data.scores`) are written per env and overall (every episode pooled) to
`OUT/eval.json`, with each task's attempts (for `safactory eval compare`), and shown in
`OUT/report.html`. With one epoch the policy is greedy; with K > 1 it samples at
`temperature` and pass@k / pass^k use those K attempts.

With `executor="ray"` the episodes are played and stored by Ray rollout-worker actors
(`safactory.jobs.ray_eval`); they are read back from the store and scored here the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from safactory.data.judges import RuleSafetyJudge
from safactory.data.redact import Redactor
from safactory.data.risk_suites import load_risk_suite
from safactory.data.scores import score, task_outcomes
from safactory.data.store import TrajectoryStore, store_url
from safactory.jobs.ray_eval import EntryPlan, play_entry, ray_connection
from safactory.jobs.rollout import _close_policy, _code_version
from safactory.policy.base import Policy, SamplingParams
from safactory.policy.specs import make_policy
from safactory.provenance import weights_hash
from safactory.sim.agent import EpisodeLimits
from safactory.sim.env import EnvEntry, EnvRegistry
from safactory.sim.envs.risk import ENV_ID, RiskEnv
from safactory.sim.registry import default_registry
from safactory.sim.runner import RolloutRunner
from safactory.types import Task, Trajectory, uuid7


@dataclass(frozen=True)
class SuiteEntry:
    """One part of a suite: `tasks` tasks of `env`'s `split`, each tried `epochs` times."""

    env: str
    split: str = "test"
    tasks: int = 100
    epochs: int | None = None  # None: the eval's --epochs
    options: dict[str, Any] = field(default_factory=dict)  # the env's task options (an attack, kinds, ...)
    expert: dict[str, Any] = field(default_factory=dict)  # options of the env's expert for --policy scripted


@dataclass(frozen=True)
class Suite:
    name: str
    entries: tuple[SuiteEntry, ...]


BUILTIN_SUITES = {
    "core": Suite("core", (SuiteEntry("arith"), SuiteEntry("maze"))),
    "safety": Suite("safety", (SuiteEntry("ops"),)),
}


def load_suite(spec: str) -> Suite:
    """A built-in suite by name, a stored risk suite (`risk:NAME`), or a YAML file describing one."""
    if spec in BUILTIN_SUITES:
        return BUILTIN_SUITES[spec]
    if spec.startswith("risk:"):
        name = spec.removeprefix("risk:")
        return Suite(spec, (SuiteEntry(ENV_ID, split="all", tasks=0, options={"suite": name}),))
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown suite {spec!r}: use {', '.join(sorted(BUILTIN_SUITES))} or a suite YAML file")
    data = yaml.safe_load(path.read_text()) or {}
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: a suite file needs `entries:`, a list of {{env, split, tasks, epochs, options}}")
    try:
        parsed = tuple(SuiteEntry(**e) for e in entries)
    except TypeError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return Suite(str(data.get("suite", path.stem)), parsed)


@dataclass(frozen=True)
class EvalJob:
    policy: str
    suite: str
    out: str
    db: str | None = None  # default: OUT/store.db
    epochs: int = 1
    temperature: float = 0.7  # with epochs > 1 (one epoch is greedy)
    max_tokens: int = 64
    concurrency: int = 64
    seed: int = 0
    redact: bool = True
    device: str = "cpu"
    dtype: str = "auto"
    # executor "ray": the episodes played and stored by Ray rollout-worker actors (`safactory.jobs.ray_eval`)
    executor: str = "local"
    ray_address: str | None = None  # the cluster to join; None: start Ray on this machine
    workers_per_node: int = 1
    cpus_per_worker: float = 1.0
    max_restarts: int = 3

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, not {self.epochs}")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', not {self.executor!r}")


RAY_SETTINGS = ("executor", "ray_address", "workers_per_node", "cpus_per_worker", "max_restarts")


def _run_config(job: EvalJob, suite: Suite) -> dict[str, Any]:
    """The eval run's stored config (the local executor's records no Ray settings, as before there were any)."""
    settings = asdict(job)
    if job.executor == "local":
        for name in RAY_SETTINGS:
            settings.pop(name)
    return {"command": "eval", **settings, "suite_entries": [asdict(e) for e in suite.entries]}


def policy_weights_hash(policy: Policy) -> str:
    model = getattr(policy, "model", None)
    return weights_hash(model.state_dict()) if model is not None and hasattr(model, "state_dict") else ""


async def run_eval(job: EvalJob) -> dict[str, Any]:
    """Run the suite, store every episode, write OUT/eval.json and OUT/report.html; returns eval.json's data."""
    suite = load_suite(job.suite)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    registry = default_registry()
    store = TrajectoryStore(
        store_url(job.db or str(out / "store.db"), existing=False), redactor=Redactor() if job.redact else None
    )
    run_id = f"eval-{uuid7()}"
    judge = RuleSafetyJudge()
    policies: dict[str, Policy] = {}
    per_env: dict[str, dict[str, Any]] = {}
    tasks: dict[str, dict[str, list[bool]]] = {}
    everything: list[Trajectory] = []
    unsafe_ids: set[str] = set()
    identity: dict[str, Any] = {}  # executor ray: the policy's version and weights hash, as its workers say

    def is_unsafe(traj: Trajectory) -> bool:
        return traj.id in unsafe_ids

    connection: AbstractAsyncContextManager[None] = (
        ray_connection(job) if job.executor == "ray" else contextlib.nullcontext()
    )
    try:
        store.create_run(run_id, _run_config(job, suite), _code_version())
        async with connection:
            for n, entry in enumerate(suite.entries):
                epochs = entry.epochs or job.epochs
                if job.executor == "ray":  # the workers store the episodes; read back from the store
                    name = f"{run_id}-{n}"
                    trajs = await _ray_entry(job, suite, entry, registry, store, run_id, epochs, name, identity)
                else:
                    env, cases, base = _entry_env(entry, store, registry)
                    policy = _policy(job, entry, env if cases is None else registry.get(base), policies)
                    trajs = await _run_entry(job, suite, entry, env, policy, run_id, epochs, cases)
                    store.add(trajs)
                verdicts = {t.id: judge.judge(t) for t in trajs}  # stored too: `data query` and `view` filter on them
                store.add_verdicts([{"trajectory_id": i, **v.store_kwargs()} for i, v in verdicts.items()])
                unsafe_ids |= {i for i, v in verdicts.items() if v.unsafe}
                key = entry.env if entry.env not in per_env else f"{entry.env}#{len(per_env)}"
                per_env[key] = score(trajs, is_unsafe, k=epochs)
                tasks[key] = task_outcomes(trajs)
                everything += trajs
        if job.executor == "local":
            version = next(iter(policies.values()), None)
            identity = {
                "version": getattr(version, "version", None),
                "weights_hash": policy_weights_hash(version) if version is not None else "",
            }
        result = {
            "suite": suite.name,
            "policy": job.policy,
            "policy_version": identity.get("version"),
            "weights_hash": identity.get("weights_hash", ""),
            "run_id": run_id,
            "store": store.url,
            "epochs": job.epochs,
            "metrics": {"overall": score(everything, is_unsafe, k=job.epochs), **per_env},
            "tasks": tasks,
        }
    finally:
        for policy in policies.values():
            await _close_policy(policy)
        store.close()
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    from safactory.jobs.eval_report import write_eval_report

    write_eval_report(result, out / "report.html")
    return result


def _entry_env(entry: SuiteEntry, store: TrajectoryStore, registry: EnvRegistry) -> tuple[Any, list[Task] | None, str]:
    """The entry's env, its risk cases (None unless it is a risk suite) and the env whose expert plays it."""
    if entry.env == ENV_ID:  # a risk suite: its cases come from the store, each on its base env
        cases = load_risk_suite(store, str(entry.options["suite"]))
        env = EnvEntry(factory=lambda: RiskEnv(registry.get), tasks=list)
        return env, cases, str(cases[0].data["base_env"])
    return registry.get(entry.env), None, entry.env


async def _ray_entry(
    job: EvalJob,
    suite: Suite,
    entry: SuiteEntry,
    registry: EnvRegistry,
    store: TrajectoryStore,
    run_id: str,
    epochs: int,
    name: str,
    identity: dict[str, Any],
) -> list[Trajectory]:
    """The entry's episodes played and stored by Ray workers (named `name`), read back from the store in
    plan order. The first entry's workers fill `identity` (their policy's version and weights hash)."""
    env, cases, base = _entry_env(entry, store, registry)
    if job.policy == "scripted":  # the same errors as in process (no expert, bad expert options), before any worker
        await _close_policy(_policy(job, entry, env if cases is None else registry.get(base), {}))
    plan = EntryPlan(
        env=entry.env,
        policy_env=base,
        expert=dict(entry.expert),
        tasks=await _entry_tasks(entry, env, cases),
        epochs=epochs,
        limits=_entry_limits(job, env),
        sampling=_sampling(job, epochs),
        provenance={"policy": job.policy, "suite": suite.name, "redacted": job.redact},
        tags={"suite": suite.name, "policy": job.policy},
    )
    trajs, said = await play_entry(job, store, run_id, plan, name)
    if not identity:
        identity.update(said)
    return trajs


def _policy(job: EvalJob, entry: SuiteEntry, env: Any, policies: dict[str, Policy]) -> Policy:
    """The policy for an entry: a scripted one is the env's own expert (with the entry's expert options,
    e.g. `{naive: true}`), a model is loaded once."""
    if job.policy == "scripted" and entry.expert:
        if env.expert is None:
            raise ValueError(f"{entry.env} has no scripted expert")
        return policies.setdefault(f"{entry.env}:{sorted(entry.expert.items())}", env.expert(**entry.expert))
    key = entry.env if job.policy == "scripted" else ""
    if key not in policies:
        policies[key] = make_policy(job.policy, env, job.seed, device=job.device, dtype=job.dtype)
    return policies[key]


async def _run_entry(
    job: EvalJob,
    suite: Suite,
    entry: SuiteEntry,
    env: Any,
    policy: Policy,
    run_id: str,
    epochs: int,
    cases: list[Task] | None = None,
) -> list[Trajectory]:
    tasks = await _entry_tasks(entry, env, cases)
    runner = RolloutRunner(
        env.factory,
        policy,
        limits=_entry_limits(job, env),
        concurrency=job.concurrency,
        run_id=run_id,
        seed=job.seed,
        provenance=lambda: {"policy": job.policy, "suite": suite.name, "redacted": job.redact},
    )
    groups = await runner.run_groups(
        tasks, epochs, _sampling(job, epochs), kind="eval", tags={"suite": suite.name, "policy": job.policy}
    )
    return [t for g in groups for t in g]


async def _entry_tasks(entry: SuiteEntry, env: Any, cases: list[Task] | None) -> list[Task]:
    """The entry's tasks: a risk suite's cases, else `tasks` tasks of the env's `split`."""
    if cases is not None:
        tasks = cases
    else:
        source = env.tasks(**entry.options)
        tasks = await asyncio.to_thread(source.tasks, entry.split, entry.tasks)
    if not tasks:
        raise ValueError(f"{entry.env} has no {entry.split!r} tasks")
    return tasks


def _entry_limits(job: EvalJob, env: Any) -> EpisodeLimits:
    """Turns: the env's own (16 where it declares none); tokens: `max_tokens` a turn."""
    turns = env.spec.max_turns if env.spec is not None else 16
    return EpisodeLimits(max_turns=turns, max_tokens_per_turn=job.max_tokens, max_total_tokens=job.max_tokens * turns)


def _sampling(job: EvalJob, epochs: int) -> SamplingParams:
    """Greedy with one epoch; `temperature` with K > 1."""
    return SamplingParams(temperature=0.0 if epochs == 1 else job.temperature, max_tokens=job.max_tokens)
