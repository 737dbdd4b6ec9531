"""Seeded fault injection with real processes: SIGKILL at random (seeded) points, then resume or re-run.

Faults: `safactory run` killed and resumed; `safactory train` killed and resumed;
`safactory rollout` killed and run again; a store writer killed (SQLite and PostgreSQL); an
env server (`safactory serve-env`) killed under a running rollout and restarted;
PostgreSQL restarted under a writer and under a rollout; an inference endpoint that hangs
or answers malformed JSON. After each: 0 trajectories lost (every acknowledged one is
stored), 0 duplicated (each id once, each consumption once), `safactory data verify` passes.

Every trial draws its kill point from `random.Random(f"{fault}-{trial}")`: the same points on
every run, a different point per trial. The default tier runs one trial each of the writer,
trainer and rollout kills, the PostgreSQL restart under a writer and the endpoint (the closed
loop's kill and resume has its default-tier test in test_resume.py); the slow tier (`-m slow`)
runs the other trials: 24 kills, 5 PostgreSQL restarts, 2 endpoint trials. With
SAFACTORY_CAMPAIGN_LOG set to a file, each trial appends a JSON line with what it did and
found (docs/reliability.md is written from it).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from sqlalchemy import select, text
from typer.testing import CliRunner

from safactory.cli import app
from safactory.data.schema import trajectories
from safactory.data.store import TrajectoryStore
from safactory.data.writer import StoreWriter
from safactory.policy.base import SamplingParams
from safactory.policy.endpoint import EndpointPolicy
from safactory.sim.agent import EpisodeLimits
from safactory.sim.envs.arith import ArithEnv, ArithExpert, ArithTasks, prompt_expression
from safactory.sim.runner import RolloutRunner
from tests.conftest import running_postgres
from tests.pg_server import PostgresServer, free_port

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from safactory.cli import main; main()"]
HANG_S = 600.0  # no wait in a trial gets near this unless something hangs; then the trial fails


def rng_of(fault: str, trial: int) -> random.Random:
    return random.Random(f"{fault}-{trial}")


def trials(fault: str, fast: list[int], slow: int) -> list[Any]:
    """Trial numbers: `fast` in the default tier, the rest up to `slow` under -m slow."""
    return [pytest.param(t, id=f"{fault}-{t}") for t in fast] + [
        pytest.param(t, id=f"{fault}-{t}", marks=pytest.mark.slow) for t in range(slow) if t not in fast
    ]


def record(fault: str, trial: int, **found: Any) -> None:
    """Append what a trial did and found to $SAFACTORY_CAMPAIGN_LOG (when set)."""
    log = os.environ.get("SAFACTORY_CAMPAIGN_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"fault": fault, "trial": trial, **found}) + "\n")


# ---- processes -----------------------------------------------------------------------------------


class Proc:
    """A real `safactory` (or helper) process: stdout lines collected by a thread, stderr to a file."""

    def __init__(self, args: list[str], log: Path, *, module: str | None = None) -> None:
        command = [sys.executable, "-m", module, *args] if module else [*CLI, *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = log
        self._err: IO[bytes] = log.open("wb")
        self.popen = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._err, env=env, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))

    def next_line(self, deadline: float) -> str | None:
        """The next stdout line, or None once the process has ended and said everything."""
        while True:
            try:
                line = self.lines.get(timeout=0.05)
                self.seen.append(line)
                return line
            except queue.Empty:
                if self.popen.poll() is not None and not self._reader.is_alive() and self.lines.empty():
                    return None
                assert time.monotonic() < deadline, f"no progress; stderr: {self.stderr()[-2000:]}"

    def kill9(self) -> bool:
        """SIGKILL; True when the process was still running to receive it."""
        alive = self.popen.poll() is None
        if alive:
            os.kill(self.popen.pid, signal.SIGKILL)
        self.wait()
        return alive

    def wait(self, timeout: float = HANG_S) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(30)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        self._err.close()
        return code

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_for(condition: Callable[[], bool], proc: Proc | None = None, what: str = "") -> None:
    """Poll `condition` until it holds; fails if `proc` ended first or nothing happens for HANG_S."""
    deadline = time.monotonic() + HANG_S
    while not condition():
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(
                f"{what}: the process ended first (exit {proc.popen.returncode}): {proc.stderr()[-3000:]}"
            )
        assert time.monotonic() < deadline, f"{what}: no progress"
        time.sleep(0.02)


# ---- the store, as the checks see it ---------------------------------------------------------------


def stored_hashes(url: str) -> dict[str, str]:
    """id -> content hash of every stored trajectory; fails on a duplicated id."""
    store = TrajectoryStore(url)
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(select(trajectories.c.id, trajectories.c.content_hash)).all()
    finally:
        store.close()
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)), "a trajectory id is stored twice"
    return {r[0]: r[1] for r in rows}


def count(url: str) -> int:
    store = TrajectoryStore(url)
    try:
        return store.count()
    finally:
        store.close()


def verifies(url: str) -> None:
    """`safactory data verify` passes on the store."""
    result = CliRunner().invoke(app, ["data", "verify", "--db", url])
    assert result.exit_code == 0 and "ok:" in result.output, result.output


def consumption(url: str, consumer: str) -> list[tuple[str, int]]:
    store = TrajectoryStore(url)
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT trajectory_id, train_step FROM consumption WHERE consumer = :c"), {"c": consumer}
            ).all()
    finally:
        store.close()
    return [(r[0], int(r[1])) for r in rows]


def kept(before: dict[str, str], after: dict[str, str]) -> None:
    """Nothing stored before is lost or changed."""
    lost = [i for i in before if i not in after]
    changed = [i for i in before if i in after and after[i] != before[i]]
    assert not lost and not changed, f"{len(lost)} lost, {len(changed)} changed"


# ---- 1. a store writer, SIGKILLed mid-ingest -----------------------------------------------------------


def writer_trial(url: str, fault: str, trial: int, tmp_path: Path) -> None:
    rng = rng_of(fault, trial)
    run_id = f"w{trial}"
    acked: list[str] = []
    acks, pause = rng.randint(1, 12), rng.uniform(0.0, 0.03)
    proc = Proc([url, run_id, "100000", str(trial)], tmp_path / "writer.log", module="tests.fault_writer")
    deadline = time.monotonic() + HANG_S
    while len(acked) < 10 * acks:
        line = proc.next_line(deadline)
        assert line is not None and line.startswith("ack "), (line, proc.stderr()[-2000:])
        acked += line.split()[1:]
    time.sleep(pause)  # somewhere inside the next transaction, or between two
    assert proc.kill9()
    acked += [i for line in proc.seen if line.startswith("ack ") for i in line.split()[1:] if i not in acked]
    after_kill = stored_hashes(url)
    assert set(acked) <= set(after_kill), "an acknowledged trajectory is missing"
    verifies(url)
    # re-run: a new writer appends to the same run, and ends normally
    again = Proc([url, run_id, "3", str(trial + 1000)], tmp_path / "writer2.log", module="tests.fault_writer")
    assert again.wait() == 0, again.stderr()
    final = stored_hashes(url)
    kept(after_kill, final)
    assert len(final) == len(after_kill) + 30
    verifies(url)
    record(
        fault,
        trial,
        killed_after_acks=acks,
        pause_s=round(pause, 3),
        acked=len(acked),
        stored=len(final),
    )


@pytest.mark.parametrize("trial", trials("writer-sqlite", [0], 4))
def test_kill_9_store_writer_sqlite(tmp_path: Path, trial: int) -> None:
    writer_trial(f"sqlite:///{tmp_path / 'store.db'}", "writer-sqlite", trial, tmp_path)


@pytest.mark.parametrize("trial", trials("writer-postgresql", [], 4))
def test_kill_9_store_writer_postgresql(postgres: PostgresServer, tmp_path: Path, trial: int) -> None:
    url = postgres.create_database(f"fw_{trial}_{os.getpid()}_{time.monotonic_ns() % 10**9}")
    writer_trial(url, "writer-postgresql", trial, tmp_path)


# ---- 2. `safactory train`, SIGKILLed and resumed ---------------------------------------------------------


def demo_store(url: str, n: int = 40) -> None:
    """`n` successful expert episodes of arith in run `data`."""
    store = TrajectoryStore(url)
    store.create_run("data", {})
    runner = RolloutRunner(ArithEnv, ArithExpert(), limits=EpisodeLimits(), run_id="data")
    groups = asyncio.run(runner.run_groups(ArithTasks().tasks("train", n), 1, SamplingParams(), kind="expert"))
    store.add([t for g in groups for t in g])
    store.close()


@pytest.mark.parametrize("trial", trials("train", [2], 5))
def test_kill_9_trainer_then_resume(tmp_path: Path, trial: int) -> None:
    rng = rng_of("train", trial)
    url = f"sqlite:///{tmp_path / 'data.db'}"
    demo_store(url)
    before = stored_hashes(url)
    out = tmp_path / "job"
    every = rng.choice([1, 2, 3, 4])
    args = ["train", "--db", url, "--out", str(out), "--mode", "sft", "--steps", "50", "--batch-size", "4"]
    args += ["--checkpoint-every", str(every)]
    kill_after, pause = rng.randint(0, 8), rng.uniform(0.0, 0.1)
    proc = Proc(args, tmp_path / "train.log")
    deadline = time.monotonic() + HANG_S
    step = 0
    while step < kill_after:
        line = proc.next_line(deadline)
        assert line is not None, proc.stderr()[-3000:]
        if line.startswith("{"):
            step = json.loads(line)["step"]
    time.sleep(pause if kill_after else rng.uniform(0.5, 3.0))  # 0: somewhere in start-up
    assert proc.kill9(), "the trainer finished before the kill"
    # resume (or start again, when it died before writing its job file)
    resumed = (out / "train.json").exists()
    again = ["train", "--out", str(out), "--resume"] if resumed else args
    done = Proc(again, tmp_path / "resume.log")
    assert done.wait() == 0, done.stderr()[-3000:]
    consumer = json.loads((out / "train.json").read_text())["consumer"]
    rows = consumption(url, consumer)
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)) == 40, "each demonstration trains the final model exactly once"
    assert sorted(Counter(r[1] for r in rows).items()) == [(s, 4) for s in range(1, 11)]
    kept(before, stored_hashes(url))
    verifies(url)
    store = TrajectoryStore(url)
    lineage = [(c["version"], c["parent_version"]) for c in store.checkpoints(consumer)]
    store.close()
    versions = [v for v, _ in lineage]
    assert versions == sorted(set(versions)) and versions[-1] == 10
    assert [p for _, p in lineage] == [None, *versions[:-1]], f"each checkpoint's parent is the one before: {lineage}"
    record(
        "train",
        trial,
        checkpoint_every=every,
        killed_after_step=step,
        resumed=resumed,
        consumed=len(ids),
    )


class Killed(BaseException):
    """Stands for a kill -9 at that point."""


def test_a_checkpoint_saved_but_not_yet_recorded_is_recorded_on_resume(tmp_path: Path, monkeypatch) -> None:
    """Killed between writing checkpoint step 4 and recording it in the store: the resumed job
    records it, so the lineage in the store has no hole (step 8's parent is a recorded checkpoint)."""
    from safactory.jobs.train import OfflineTrainer, TrainJob

    url = f"sqlite:///{tmp_path / 'data.db'}"
    demo_store(url)
    real = TrajectoryStore.add_checkpoint

    def killed_at_4(self: TrajectoryStore, run_id: str, version: int, **kw: Any) -> None:
        if version == 4:
            raise Killed
        real(self, run_id, version, **kw)

    monkeypatch.setattr(TrajectoryStore, "add_checkpoint", killed_at_4)
    job = TrainJob(db=url, out=str(tmp_path / "job"), steps=50, batch_size=4, checkpoint_every=4)
    with pytest.raises(Killed):
        OfflineTrainer(job, log=lambda _: None).run()
    monkeypatch.undo()
    OfflineTrainer.resume(tmp_path / "job", log=lambda _: None).run()
    store = TrajectoryStore(url)
    lineage = [(c["version"], c["parent_version"]) for c in store.checkpoints(job.consumer)]
    store.close()
    assert lineage == [(4, None), (8, 4), (10, 8)]


# ---- 3. `safactory run`, SIGKILLed and resumed -------------------------------------------------------------

RUN_STEPS, RUN_GROUPS, RUN_G = 12, 2, 2


def run_overrides(every: int) -> list[str]:
    sets = [
        "seed=1",
        "env.train_tasks=100",
        "env.test_tasks=8",
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "rollout.concurrency=16",
        "rollout.max_batch=16",
        "logging.tensorboard=false",
        "logging.report=false",
        "sft.enabled=false",
        f"rl.steps={RUN_STEPS}",
        f"rl.tasks_per_step={RUN_GROUPS}",
        f"rl.group_size={RUN_G}",
        "rl.eval_every=0",
        "rl.drop_equal_groups=false",
        "rl.temperature=1.5",
        f"checkpoint_every={every}",
        "gate.enabled=false",
    ]
    return [a for s in sets for a in ("--set", s)]


def rl_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    step = 0
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if row.get("phase") == "rl":
                step = max(step, row["train/step"])
    return step


def kill_run(proc: Proc, out: Path, rng: random.Random) -> str:
    """SIGKILL a closed-loop run at a seeded point: in start-up, or after RL step k; says where."""
    k = rng.randint(0, RUN_STEPS - 5)
    if k == 0:
        wait_for(lambda: (out / "config.yaml").exists(), proc, "run start")
        time.sleep(rng.uniform(0.0, 1.5))
    else:
        wait_for(lambda: rl_step(out) >= k, proc, f"RL step {k}")
        time.sleep(rng.uniform(0.0, 0.15))
    where = f"RL step {rl_step(out)}" if k else "start-up"
    assert proc.kill9(), f"the run finished before the kill ({where})"
    return where


@pytest.mark.parametrize("trial", trials("run", [], 5))
def test_kill_9_run_then_resume(tmp_path: Path, trial: int) -> None:
    rng = rng_of("run", trial)
    out = tmp_path / "run"
    every = rng.choice([1, 2, 3])
    proc = Proc(["run", "examples/arith.yaml", "--out", str(out), *run_overrides(every)], tmp_path / "run.log")
    kills = [kill_run(proc, out, rng)]
    url = f"sqlite:///{out / 'store.db'}"
    before = stored_hashes(url) if (out / "store.db").exists() else {}
    if rng.random() < 0.5:  # the resumed run is killed too
        proc = Proc(["run", "--resume", str(out)], tmp_path / "resume1.log")
        kills.append(kill_run(proc, out, rng) if rl_step(out) < RUN_STEPS - 5 else "not killed (past the point)")
        if proc.popen.returncode is None:
            assert proc.wait() == 0, proc.stderr()[-3000:]
        before = stored_hashes(url)
    done = Proc(["run", "--resume", str(out)], tmp_path / "resume.log")
    assert done.wait() == 0, done.stderr()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rl"]["steps"] == RUN_STEPS
    after = stored_hashes(url)
    kept(before, after)
    verifies(url)
    store = TrajectoryStore(url)
    rollouts = store.query(run_id=summary["run_id"], kind="rollout")
    versions = [c["version"] for c in store.checkpoints(summary["run_id"])]
    store.close()
    assert set(Counter(t.group_id for t in rollouts).values()) == {RUN_G}, "every stored group is whole"
    rows = consumption(url, summary["run_id"])
    consumed = [r[0] for r in rows]
    assert len(consumed) == len(set(consumed)) == RUN_STEPS * RUN_GROUPS * RUN_G
    per_step = Counter(r[1] for r in rows)
    assert sorted(per_step) == list(range(1, RUN_STEPS + 1)) and set(per_step.values()) == {RUN_GROUPS * RUN_G}
    assert versions == list(range(len(versions))), "no policy version reused or skipped"
    record(
        "run",
        trial,
        checkpoint_every=every,
        kills=kills,
        stored=len(after),
        consumed=len(consumed),
    )


# ---- 4. `safactory rollout`, SIGKILLed and run again ----------------------------------------------------

EPISODES, GROUP = 160, 4


def rollout_args(env: str, db: str, seed: int, episodes: int = EPISODES, group: int = GROUP) -> list[str]:
    return [
        "rollout",
        "--env",
        env,
        "--policy",
        "random",
        "--episodes",
        str(episodes),
        "--group-size",
        str(group),
        "--concurrency",
        "8",
        "--db",
        db,
        "--seed",
        str(seed),
    ]


def runs_of(url: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """run id -> (id, group id, termination, error) of each of its trajectories."""
    store = TrajectoryStore(url)
    try:
        by_run: dict[str, list[tuple[str, str, str, str]]] = {r: [] for r in store.run_ids()}
        for t in store.iter():
            by_run.setdefault(t.run_id, []).append((t.id, t.group_id, t.termination, t.error or ""))
    finally:
        store.close()
    return by_run


@pytest.mark.parametrize("trial", trials("rollout", [0], 5))
def test_kill_9_rollout_then_run_again(tmp_path: Path, trial: int) -> None:
    rng = rng_of("rollout", trial)
    db = tmp_path / "store.db"
    url = f"sqlite:///{db}"
    TrajectoryStore(url).close()  # the schema, so the test can watch the count from the start
    at, pause = rng.randint(0, EPISODES - 60), rng.uniform(0.0, 0.05)
    proc = Proc(rollout_args("arith", str(db), trial), tmp_path / "rollout.log")
    wait_for(lambda: count(url) >= at, proc, f"{at} episodes stored")
    time.sleep(pause)
    assert proc.kill9(), "the rollout finished before the kill"
    before = stored_hashes(url)
    (killed,) = runs_of(url).values() or [[]]
    assert set(Counter(g for _, g, _, _ in killed).values()) <= {GROUP}, "every stored group is whole"
    verifies(url)
    again = Proc(rollout_args("arith", str(db), trial), tmp_path / "again.log")
    assert again.wait() == 0, again.stderr()[-3000:]
    after = stored_hashes(url)
    kept(before, after)
    assert len(after) == len(before) + EPISODES
    verifies(url)
    record("rollout", trial, killed_at_stored=len(before), stored=len(after))


# ---- 5. an env server, SIGKILLed under a running rollout and restarted ----------------------------------


def start_env_server(port: int, log: Path) -> Proc:
    server = Proc(["serve-env", "arith", "--port", str(port)], log)

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, server, "env server start")
    return server


@pytest.mark.parametrize("trial", trials("env-server", [], 4))
def test_kill_9_env_server_under_a_rollout(tmp_path: Path, trial: int) -> None:
    rng = rng_of("env-server", trial)
    port = free_port()
    url, env = f"sqlite:///{tmp_path / 'store.db'}", f"http://127.0.0.1:{port}"
    TrajectoryStore(url).close()
    server = start_env_server(port, tmp_path / "server1.log")
    episodes, at, down = 200, rng.randint(0, 100), rng.uniform(0.0, 2.0)
    rollout = Proc(rollout_args(env, url, trial, episodes, 2), tmp_path / "rollout.log")
    try:
        wait_for(lambda: count(url) >= at, rollout, f"{at} episodes stored")
        assert server.kill9()
        time.sleep(down)
        server = start_env_server(port, tmp_path / "server2.log")
        code = rollout.wait()
        assert code in (0, 1), rollout.stderr()[-3000:]  # 1: every episode failed (all while it was down)
        (first,) = runs_of(url).values()
        assert len(first) == episodes and len({i for i, _, _, _ in first}) == episodes, "each episode stored once"
        assert set(Counter(g for _, g, _, _ in first).values()) == {2}
        failed = [(term, err) for _, _, term, err in first if term in ("env_error", "env_timeout")]
        assert all(err for _, err in failed), "each failed episode says why"
        verifies(url)
        before = stored_hashes(url)
        again = Proc(rollout_args(env, url, trial + 100, 40, 2), tmp_path / "again.log")
        assert again.wait() == 0, again.stderr()[-3000:]
        kept(before, stored_hashes(url))
        second = [r for run, rows in runs_of(url).items() for r in rows if r[0] not in before]
        assert len(second) == 40 and not [r for r in second if r[2] in ("env_error", "env_timeout")]
        assert httpx.get(f"{env}/health").json()["active_sessions"] == 0
        verifies(url)
    finally:
        for proc in (rollout, server):
            if proc.popen.poll() is None:
                proc.kill9()
    record(
        "env-server",
        trial,
        killed_at_stored=at,
        down_s=round(down, 2),
        episodes=episodes,
        env_errors=len(failed),
    )


# ---- 6. PostgreSQL restarted under a writer and under a rollout ---------------------------------------------


@pytest.fixture(scope="module")
def restartable_pg() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this module's own (the session's shared one is never restarted)."""
    yield from running_postgres()


def restart(server: PostgresServer, mode: str, down_s: float) -> None:
    """Stop the server (`fast`: backends terminated; `immediate`: a crash, recovered at start), wait, start it."""
    server._run("pg_ctl", "-D", str(server.data), "-m", mode, "-w", "stop")
    time.sleep(down_s)
    opts = f"-p {server.port} -k {server.root} -c listen_addresses=127.0.0.1 -c fsync=off"
    server._run("pg_ctl", "-D", str(server.data), "-o", opts, "-l", str(server.root / "log"), "-w", "start")


@pytest.mark.parametrize("trial", trials("pg-restart-writer", [0], 3))
def test_postgresql_restart_under_a_retrying_writer(restartable_pg: PostgresServer, tmp_path: Path, trial: int) -> None:
    """The writer sees the error, retries the same batch and finishes: every batch stored exactly once."""
    rng = rng_of("pg-restart-writer", trial)
    url = restartable_pg.create_database(f"rw_{trial}")
    batches, at = 60, rng.randint(1, 20)
    mode, down = ("immediate", "fast")[trial % 2], rng.uniform(0.0, 1.0)  # both ways of stopping, in turn
    proc = Proc([url, "run", str(batches), str(trial), "--retry"], tmp_path / "writer.log", module="tests.fault_writer")
    deadline = time.monotonic() + HANG_S
    while sum(line.startswith("ack ") for line in proc.seen) < at:
        assert proc.next_line(deadline) is not None, proc.stderr()
    restart(restartable_pg, mode, down)
    assert proc.wait() == 0, proc.stderr()[-3000:]
    acked = [i for line in proc.seen if line.startswith("ack ") for i in line.split()[1:]]
    errors = [line for line in proc.seen if line.startswith("error ")]
    assert proc.seen[-1] == "done" and len(acked) == len(set(acked)) == 10 * batches
    assert set(stored_hashes(url)) == set(acked), "every batch once, nothing else"
    verifies(url)
    record(
        "pg-restart-writer",
        trial,
        mode=mode,
        down_s=round(down, 2),
        restarted_after_acks=at,
        errors_seen=len(errors),
        acked=len(acked),
    )


@pytest.mark.parametrize("trial", trials("pg-restart-rollout", [], 3))
def test_postgresql_restart_under_a_rollout(restartable_pg: PostgresServer, tmp_path: Path, trial: int) -> None:
    """The rollout either rides it out or stops with a clear one-line error; what it stored is whole."""
    rng = rng_of("pg-restart-rollout", trial)
    url = restartable_pg.create_database(f"rr_{trial}")
    TrajectoryStore(url).close()
    at, mode, down = rng.randint(0, 100), ("fast", "immediate")[trial % 2], rng.uniform(0.0, 1.0)
    proc = Proc(rollout_args("arith", url, trial, 400), tmp_path / "rollout.log")
    wait_for(lambda: count(url) >= at, proc, f"{at} episodes stored")
    restart(restartable_pg, mode, down)
    code = proc.wait()
    said = [line for line in proc.stderr().splitlines() if line.startswith("error: ")]
    if code != 0:
        assert said and ("OperationalError" in said[-1] or "connection" in said[-1]), proc.stderr()[-3000:]
    (rows,) = runs_of(url).values()
    assert len({i for i, _, _, _ in rows}) == len(rows) and set(Counter(g for _, g, _, _ in rows).values()) <= {GROUP}
    verifies(url)
    before = stored_hashes(url)
    again = Proc(rollout_args("arith", url, trial + 100, 40), tmp_path / "again.log")
    assert again.wait() == 0, again.stderr()[-3000:]
    kept(before, stored_hashes(url))
    verifies(url)
    record(
        "pg-restart-rollout",
        trial,
        mode=mode,
        down_s=round(down, 2),
        restarted_at_stored=at,
        exit_code=code,
        error=said[-1][:160] if said else "",
        stored_before_rerun=len(rows),
    )


# ---- 7. an inference endpoint that hangs or answers malformed JSON ------------------------------------------

MODES = ("ok", "hang", "not_json", "truncated", "wrong_shape", "http_500", "bad_arguments")


class MisbehavingEndpoint(ThreadingHTTPServer):
    """An OpenAI-style chat server of our own that answers each episode in the way its prompt was given:
    correctly (calc, then answer), never (it hangs), with a body that is not JSON or is cut short, with JSON
    of the wrong shape, with HTTP 500, or with tool call arguments that are not JSON."""

    daemon_threads = True

    def __init__(self, modes: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.modes = modes
        self.release = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: MisbehavingEndpoint

    def log_message(self, *args: Any) -> None:
        return None

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        messages = body["messages"]
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        mode = self.server.modes[prompt]
        if mode == "hang":
            self.server.release.wait(30)
            return
        if mode == "http_500":
            return self._send(500, b'{"error": {"message": "model crashed"}}')
        last = messages[-1]
        if last["role"] == "tool" and not last["content"].startswith("error"):
            name, arguments = "answer", {"value": last["content"]}
        else:
            name, arguments = "calc", {"expression": prompt_expression(prompt)}
        raw = "{not json" if mode == "bad_arguments" else json.dumps(arguments)
        call = {"id": "c0", "type": "function", "function": {"name": name, "arguments": raw}}
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "", "tool_calls": [call]},
            "finish_reason": "tool_calls",
            "logprobs": None,
        }
        answer = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]})
        if mode == "not_json":
            answer = "<html>502 bad gateway</html>"
        elif mode == "truncated":
            answer = answer[: len(answer) // 2]
        elif mode == "wrong_shape":
            answer = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "choices": ["calc"]})
        self._send(200, answer.encode())

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


EXPECTED_ERROR = {
    "hang": "down or unreachable",
    "http_500": "down or unreachable",
    "not_json": "malformed body",
    "truncated": "malformed body",
    "wrong_shape": "malformed chat completion",
}


def check_endpoint_episodes(rows: list[Any], modes: dict[str, str]) -> Counter[str]:
    seen: Counter[str] = Counter()
    for traj in rows:
        mode = modes[traj.task.prompt]
        seen[mode] += 1
        if mode == "ok":
            assert traj.success and traj.termination == "terminated", traj.error
        elif mode == "bad_arguments":  # the endpoint answered: a parse error for the env to see, not a policy error
            assert traj.termination != "policy_error" and "not valid JSON" in (traj.steps[0].error or "")
        else:
            assert traj.termination == "policy_error" and EXPECTED_ERROR[mode] in (traj.error or ""), traj.error
    return seen


@pytest.mark.parametrize("trial", trials("endpoint", [0], 3))
def test_a_misbehaving_endpoint_ends_episodes_with_policy_error_and_the_run_goes_on(tmp_path: Path, trial: int) -> None:
    rng = rng_of("endpoint", trial)
    tasks = ArithTasks(seed=trial).tasks("test", 21)
    order = [MODES[i % len(MODES)] for i in range(len(tasks))]
    rng.shuffle(order)
    modes = {t.prompt: m for t, m in zip(tasks, order, strict=True)}
    server = MisbehavingEndpoint(modes)
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'store.db'}")
    store.create_run("r", {})
    policy = EndpointPolicy(server.url, "m", timeout_s=0.5, max_attempts=2, backoff_s=0.01, token_ids=False)

    async def go() -> None:
        writer = StoreWriter(store)
        runner = RolloutRunner(ArithEnv, policy, limits=EpisodeLimits(), concurrency=8, run_id="r")
        await runner.run_groups(tasks, 1, SamplingParams(), on_group=writer.put)
        await writer.close()
        await policy.close()

    try:
        asyncio.run(go())
    finally:
        server.close()
    rows = store.query(run_id="r")
    store.close()
    assert len(rows) == len(tasks) == len({t.id for t in rows}), "every episode stored once"
    seen = check_endpoint_episodes(rows, modes)
    assert set(seen) == set(MODES)
    verifies(f"sqlite:///{tmp_path / 'store.db'}")
    record("endpoint", trial, episodes=len(rows), modes=dict(seen))


def test_safactory_rollout_against_a_misbehaving_endpoint(tmp_path: Path) -> None:
    """The CLI path (`--policy openai:...`): malformed answers end their episodes; the rollout finishes."""
    tasks = ArithTasks().tasks("test", 8)
    order = ["ok", "not_json", "wrong_shape", "bad_arguments"] * 2
    modes = {t.prompt: m for t, m in zip(tasks, order, strict=True)}
    server = MisbehavingEndpoint(modes)
    db = tmp_path / "store.db"
    try:
        args = ["rollout", "--env", "arith", "--policy", f"openai:{server.url}#m", "--episodes", "8", "--db", str(db)]
        result = CliRunner().invoke(app, args)
    finally:
        server.close()
    assert result.exit_code == 0, result.output
    store = TrajectoryStore(f"sqlite:///{db}")
    rows = store.query()
    store.close()
    assert check_endpoint_episodes(rows, modes) == Counter({m: 2 for m in set(order)})
    verifies(f"sqlite:///{db}")
