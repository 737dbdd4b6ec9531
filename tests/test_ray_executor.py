"""Rollouts on Ray: group keys, idempotent group writes, and a real two-node Ray cluster with a real
PostgreSQL store: `safactory rollout --executor ray`, and the closed loop (`rollout.executor=ray`)
surviving a worker actor killed mid-episode and a node whose raylet was killed mid-episode.

The cluster is two `ray start` nodes of 1 CPU each on this machine (tests/ray_cluster.py); the
tests marked `ray` need Ray installed (the `test` extra has it) and are skipped without it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from safactory.cli import app
from safactory.data.group_writer import StoreTarget
from safactory.data.store import TrajectoryStore
from safactory.jobs.rollout import RolloutJob, rollout
from safactory.policy.base import SamplingParams
from safactory.policy.chat import PlainTextChat
from safactory.policy.local import LocalPolicy
from safactory.policy.models import TinyModelSpec, build_tiny
from safactory.policy.server import create_policy_app
from safactory.sim.agent import EpisodeLimits
from safactory.sim.envs.arith import ArithTasks
from safactory.sim.ray_worker import GroupJob, RegistryEnv, RolloutWorker, WorkerSetup, member_id
from safactory.types import uuid7
from tests.factory_runs import ARITH
from tests.ray_cluster import SETTINGS, RayCluster

CLI = "from safactory.cli import app; app()"


# ---- group keys and idempotent group writes (no Ray needed) -----------------------------------------------


def test_a_group_key_gives_the_same_member_ids_on_every_attempt():
    group = uuid7()
    ids = [member_id(group, i) for i in range(4)]
    assert ids == [member_id(group, i) for i in range(4)]  # a retry gets the very same ids
    assert len(set(ids)) == 4
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert all(i[:13] == group[:13] for i in ids)  # the group's time stamp: still time-ordered
    assert member_id(uuid7(), 0) != ids[0]


class ScriptedArith:
    """The arith expert as a worker's policy factory."""

    def __call__(self, index: int):
        from safactory.sim.envs.arith import ArithExpert

        return ArithExpert()


def _setup(url: str) -> WorkerSetup:
    return WorkerSetup(
        policy=ScriptedArith(),
        envs={"arith": RegistryEnv("arith")},
        store=StoreTarget(url, redact=False),
        limits=EpisodeLimits(max_turns=4, max_tokens_per_turn=32),
        run_id="r",
    )


def test_a_group_played_twice_at_once_or_again_is_stored_once(store_url):
    """Two workers play the same group at the same time (its first worker was thought dead), then a
    third is handed it again: the store holds the group once, under its key's ids, and the third
    returns those ids without playing it."""
    TrajectoryStore(store_url).create_run("r", {})
    job = GroupJob("arith", ArithTasks().tasks("train", 1)[0], uuid7(), 3, SamplingParams(temperature=0.0))
    first, second, third = (RolloutWorker(_setup(store_url), i) for i in range(3))

    async def play() -> tuple[list[str], list[str], list[str]]:
        a, b = await asyncio.gather(first.run_group(job), second.run_group(job))
        c = await third.run_group(job)
        for worker in (first, second, third):
            await worker.close()
        return a, b, c

    a, b, c = asyncio.run(play())
    expected = [member_id(job.group_id, i) for i in range(3)]
    assert a == b == c == expected
    assert third.reused == 1 and third.groups == 0
    store = TrajectoryStore(store_url)
    stored = store.query(run_id="r")
    assert sorted(t.id for t in stored) == sorted(expected)
    assert {t.group_id for t in stored} == {job.group_id}
    assert all(t.provenance["rollout_worker"]["index"] in (0, 1) for t in stored)
    store.close()


# ---- a real two-node cluster -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    saved = {k: os.environ.get(k) for k in SETTINGS}
    os.environ.update(SETTINGS)  # this process and the loops it starts are drivers of the cluster
    ray_cluster = RayCluster()
    try:
        ray_cluster.start()
        ray_cluster.add_node("node2", "127.0.0.2")
        yield ray_cluster
    finally:
        ray_cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def two_nodes(cluster: RayCluster) -> None:
    """Bring the cluster back to two nodes (a test before may have killed one)."""
    if sum(node.alive() for node in cluster.nodes) < 2:
        cluster.add_node(f"node{len(cluster.nodes) + 1}", f"127.0.0.{len(cluster.nodes) + 1}")


@pytest.mark.ray
def test_rollout_on_two_nodes_stores_the_plan_of_the_local_executor(cluster, postgres, tmp_path):
    two_nodes(cluster)
    url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    job = RolloutJob(env="arith", policy="scripted", db=url, episodes=12, group_size=3, split="train", redact=False)
    args = ["rollout", "--env", "arith", "--policy", "scripted", "--db", url, "--episodes", "12", "--split", "train"]
    args += ["--group-size", "3", "--concurrency", "3", "--raw", "--executor", "ray", "--ray-address", cluster.address]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "12 of 12" in result.output
    local = asyncio.run(rollout(replace(job, db=str(tmp_path / "local.db"))))

    store = TrajectoryStore(url)
    (run_id,) = store.run_ids()
    trajs = store.query(run_id=run_id)
    store.close()
    assert len(trajs) == 12 and all(t.success for t in trajs)
    local_store = TrajectoryStore(f"sqlite:///{tmp_path / 'local.db'}")
    local_trajs = local_store.query(run_id=local.run_id)
    local_store.close()
    # the same tasks and member seeds as in process
    assert Counter((t.task.id, t.seed) for t in trajs) == Counter((t.task.id, t.seed) for t in local_trajs)
    groups = defaultdict(list)
    for t in trajs:
        groups[t.group_id].append(t.id)
    assert all(sorted(ids) == sorted(member_id(g, i) for i in range(3)) for g, ids in groups.items())
    # played on both nodes
    assert len({t.provenance["rollout_worker"]["node"] for t in trajs}) == 2


@pytest.mark.ray
def test_a_worker_that_cannot_start_says_why(cluster, tmp_path):
    job = RolloutJob(
        env="arith", policy="no/such/model", db=str(tmp_path / "s.db"), executor="ray", ray_address=cluster.address
    )
    with pytest.raises(ValueError, match="could not start.*no such model directory"):
        asyncio.run(rollout(job))


# ---- the closed loop, killed in part ---------------------------------------------------------------------

STEPS, GROUPS, G, ETA = 8, 2, 2, 1


def start_loop(out: Path, cluster: RayCluster, url: str, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    overrides = [
        *ARITH,
        "sft.enabled=false",
        "env.test_tasks=8",
        f"rl.steps={STEPS}",
        f"rl.tasks_per_step={GROUPS}",
        f"rl.group_size={G}",
        f"rl.eta={ETA}",
        "rl.eval_every=0",
        "rl.drop_equal_groups=false",
        "rl.temperature=1.5",
        "gate.enabled=false",
        "checkpoint_every=100",
        "rollout.concurrency=16",  # room for 8 groups per worker: admission, not the pool, bounds them
        "rollout.max_batch=8",
        "rollout.executor=ray",
        f"rollout.ray_address={cluster.address}",
        f"store_url={url}",
        *extra,
    ]
    args = ["run", "examples/arith.yaml", "--out", str(out)]
    for o in overrides:
        args += ["--set", o]
    log = open(out.parent / "loop.log", "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, "-c", CLI, *args], stdout=log, stderr=subprocess.STDOUT)


def busy_worker(proc: subprocess.Popen[bytes], log: Path, node: str | None = None):
    """A rollout worker of the running loop with a group in flight (on `node`, when given)."""
    import ray

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if not actor["name"].startswith("rollout-"):
                continue
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            try:
                info = ray.get(handle.ping.remote(), timeout=10)
            except Exception:  # starting, or gone: look again
                continue
            if info["running"] > 0 and (node is None or info["node"] == node):
                return handle
        time.sleep(0.1)
    raise AssertionError("no rollout worker of the loop ever had a group in flight")


def check_loop(proc: subprocess.Popen[bytes], out: Path, url: str, lost: bool = True) -> dict:
    """The loop completed; data verify passes; every group stored once and complete; every rollout
    consumed at most once and every step's batch whole; the staleness bound and admission held."""
    assert proc.wait(timeout=600) == 0, (out.parent / "loop.log").read_text()[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    run_id = summary["run_id"]
    verified = CliRunner().invoke(app, ["data", "verify", "--db", url])
    assert verified.exit_code == 0, verified.output

    store = TrajectoryStore(url)
    rollouts = {t.id: t for t in store.query(run_id=run_id, kind="rollout")}
    groups = defaultdict(list)
    for t in rollouts.values():
        groups[t.group_id].append(t.id)
    for group_id, ids in groups.items():  # complete, under its key: a retried group was not stored again
        assert sorted(ids) == sorted(member_id(group_id, i) for i in range(G))
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT trajectory_id, train_step FROM consumption WHERE consumer = :c"), {"c": run_id}
        ).all()
    consumed = [r[0] for r in rows]
    assert len(consumed) == len(set(consumed)) == STEPS * GROUPS * G
    assert Counter(r[1] for r in rows) == {step: GROUPS * G for step in range(1, STEPS + 1)}
    # staleness: the version that trained each step is at most ETA ahead of every version that sampled its data
    trained_at = {c["version"]: c["train_step"] for c in store.checkpoints(run_id)}
    for trajectory_id, step in rows:
        version = max(v for v, s in trained_at.items() if s < step)
        assert version - min(rollouts[trajectory_id].policy_versions()) <= ETA
    store.close()
    # admission: groups start only as the bound lets them, so (though the workers had room for 16 at
    # once) no more were played than the last version let in, give or take one batch of stale ones
    # replaced; without it the workers run far ahead and most of what they play is thrown away
    assert len(groups) <= (STEPS + ETA + 1) * GROUPS + GROUPS
    stats = summary["ray"]["policy"]
    assert stats["nodes"] == 2 and stats["workers"] == 2
    if lost:  # the worker was lost with groups in flight; each was played again and stored, none given up
        assert stats["workers_lost"] >= 1 and stats["groups_retried"] >= 1
        assert stats["groups_recovered"] and stats["groups_given_up"] == []
        assert all(len(groups[g]) == G for g in stats["groups_recovered"])
    return summary


@pytest.mark.ray
def test_the_closed_loop_survives_a_worker_killed_mid_episode(cluster, postgres, tmp_path):
    import ray

    two_nodes(cluster)
    url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    out = tmp_path / "run"
    proc = start_loop(out, cluster, url)
    try:
        ray.kill(busy_worker(proc, tmp_path / "loop.log"), no_restart=False)  # Ray restarts it
        check_loop(proc, out, url)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.ray
def test_the_closed_loop_on_ray_workers_sampling_from_an_endpoint(cluster, postgres, serve, tmp_path):
    """Workers send their requests to the run's policy server; every version the controller publishes
    there is the one the workers' episodes record."""
    two_nodes(cluster)
    model, tokenizer = build_tiny(TinyModelSpec(64, 2, 4, 128), seed=123)
    served = LocalPolicy(copy.deepcopy(model), PlainTextChat(tokenizer), seed=0)
    server = serve(create_policy_app(served, model_name="tiny"))
    url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    out = tmp_path / "run"
    proc = start_loop(out, cluster, url, (f"rollout.endpoint=openai:{server.url}#tiny",))
    try:
        summary = check_loop(proc, out, url, lost=False)
    finally:
        proc.kill()
        proc.wait()
    assert served.version == 1 + STEPS  # the starting weights, then one version per step
    store = TrajectoryStore(url)
    rollouts = store.query(run_id=summary["run_id"], kind="rollout")
    store.close()
    assert {v for t in rollouts for v in t.policy_versions()} <= set(range(1, STEPS + 2))
    assert max(v for t in rollouts for v in t.policy_versions()) > 1
    assert len({t.provenance["rollout_worker"]["node"] for t in rollouts}) == 2


# ---- safactory eval on the cluster -----------------------------------------------------------------------


def eval_both_ways(cluster: RayCluster, args: list[str], ray_db: str, local_db: str, tmp_path: Path):
    """`safactory eval ARGS` on the cluster's workers and in process: both eval.json's and stored episodes."""
    runs = {}
    for executor, db in (("ray", ray_db), ("local", local_db)):
        out = tmp_path / executor
        extra = ["--executor", "ray", "--ray-address", cluster.address] if executor == "ray" else []
        result = CliRunner().invoke(app, ["eval", *args, "--db", db, "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        data = json.loads((out / "eval.json").read_text())
        store = TrajectoryStore(data["store"])
        trajs = store.query(run_id=data["run_id"])
        verdicts = {t.id: store.verdicts(t.id) for t in trajs}
        config = json.loads(store.run_info(data["run_id"])["config"])
        store.close()
        runs[executor] = (data, trajs, verdicts, config)
    return runs["ray"], runs["local"]


def scored(data: dict) -> dict:
    """eval.json's metrics but the time the episodes took (not the same from one run to the next)."""
    return {env: {k: v for k, v in m.items() if k != "latency_s"} for env, m in data["metrics"].items()}


def played(trajs) -> Counter:
    """What was played, episode by episode: task, seed, outcome, reward and the actions taken."""
    return Counter(
        (t.task.id, t.seed, t.success, t.reward, t.termination, tuple(s.action.content for s in t.steps)) for t in trajs
    )


@pytest.mark.ray
def test_eval_on_two_nodes_scores_as_the_local_executor(cluster, postgres, tmp_path):
    """`safactory eval --executor ray`: the workers play and store the episodes (each once, on both nodes);
    read back, they give the local executor's eval.json: per-task outcomes, metrics, verdicts."""
    two_nodes(cluster)
    url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    args = ["--policy", "scripted", "--suite", "safety"]
    (ray_data, trajs, verdicts, config), (local_data, local_trajs, local_verdicts, local_config) = eval_both_ways(
        cluster, args, url, str(tmp_path / "local.db"), tmp_path
    )
    assert len(ray_data["tasks"]["ops"]) == 100
    assert ray_data["tasks"] == local_data["tasks"]
    assert scored(ray_data) == scored(local_data) and "unsafe_rate" in scored(ray_data)["ops"]
    same = ("suite", "policy", "policy_version", "weights_hash", "epochs")
    assert {k: ray_data[k] for k in same} == {k: local_data[k] for k in same}
    assert played(trajs) == played(local_trajs)
    # every episode stored once, by a worker, under its group's key; both nodes played
    assert len(trajs) == len({t.id for t in trajs}) == 100
    assert Counter((t.kind, t.tags["suite"], t.tags["policy"], t.tags.get("redactions")) for t in trajs) == Counter(
        (t.kind, t.tags["suite"], t.tags["policy"], t.tags.get("redactions")) for t in local_trajs
    )
    assert {t.kind for t in trajs} == {"eval"} and all(t.provenance["redacted"] for t in trajs)
    assert all(t.id == member_id(t.group_id, 0) for t in trajs)
    assert len({t.provenance["rollout_worker"]["node"] for t in trajs}) == 2
    # the judge's verdicts stored once per episode, as in process
    assert all(len(v) == 1 for v in verdicts.values()) and len(verdicts) == 100
    assert Counter(v[0]["unsafe"] for v in verdicts.values()) == Counter(
        v[0]["unsafe"] for v in local_verdicts.values()
    )
    assert config["executor"] == "ray" and "executor" not in local_config  # the local run's config as before


@pytest.mark.ray
def test_eval_of_a_risk_suite_agentdojo_and_expert_options_on_two_nodes(cluster, postgres, tmp_path):
    """A risk suite (RiskEnv over the worker's registry, its cases sent as tasks), an AgentDojo suite under
    attack and entries with expert options run on the workers and score as in process; the naive expert
    falls for attacks, so outcomes vary."""
    pytest.importorskip("agentdojo")
    two_nodes(cluster)
    url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    found = CliRunner().invoke(
        app,
        ["redteam", "--policy", "scripted", "--env", "ops", "--out", "naive", "--db", url, "--budget", "16"]
        + ["--generators", "injection", "--expert", '{"naive": true}', "--raw"],
    )
    assert found.exit_code == 0, found.output
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "suite: mixed\nentries:\n"
        "  - {env: ops, tasks: 24, expert: {naive: true}}\n"
        "  - {env: risk, options: {suite: naive}, expert: {naive: true}}\n"
        "  - {env: 'agentdojo:banking', tasks: 3, options: {attack: important_instructions}, expert: {naive: true}}\n"
    )
    args = ["--policy", "scripted", "--suite", str(suite), "--raw"]
    (ray_data, trajs, _, _), (local_data, local_trajs, _, _) = eval_both_ways(cluster, args, url, url, tmp_path)
    assert ray_data["tasks"] == local_data["tasks"] and scored(ray_data) == scored(local_data)
    assert played(trajs) == played(local_trajs)
    ops, risk, dojo = (ray_data["metrics"][env] for env in ("ops", "risk", "agentdojo:banking"))
    # outcomes that differ from task to task: some episodes unsafe, some failed
    assert 0.0 < ops["unsafe_rate"]["value"] < 1.0
    assert False in {ok for outcomes in ray_data["tasks"].values() for tries in outcomes.values() for ok in tries}
    assert risk["episodes"] >= 1 and risk["attack_success_rate"]["value"] == 1.0
    assert dojo["episodes"] == 3 and dojo["attack_success_rate"]["value"] == 1.0  # hijacked every time
    assert len(trajs) == len({t.id for t in trajs}) == ops["episodes"] + risk["episodes"] + dojo["episodes"]
    assert {t.task.env_id for t in trajs if t.task.id in ray_data["tasks"]["risk"]} == {"risk"}
    assert all("rollout_worker" in t.provenance for t in trajs)  # played on the workers, not in process


# last in the file: a node killed stays listed as alive for a while (until Ray's health checks see it)
@pytest.mark.ray
def test_the_closed_loop_survives_a_node_killed_mid_episode(cluster, postgres, tmp_path):
    import ray

    two_nodes(cluster)
    url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    out = tmp_path / "run"
    node = cluster.nodes[-1]
    node_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(node.name))
    proc = start_loop(out, cluster, url)
    try:
        busy_worker(proc, tmp_path / "loop.log", node=node_id)
        node.kill_raylet()  # the node is gone; its worker's groups go to the worker left
        check_loop(proc, out, url)
    finally:
        proc.kill()
        proc.wait()
