"""`safactory rollout` and the runner's robustness: retries at start, cancellation, failing envs, storage."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from safactory.data.integrity import verify
from safactory.data.store import TrajectoryStore
from safactory.data.writer import StoreWriter
from safactory.jobs.rollout import RolloutJob, error_kind, group_plan, rollout, rollout_command
from safactory.policy.base import Completion, SamplingParams
from safactory.policy.endpoint import EndpointPolicy
from safactory.policy.local import LocalPolicy
from safactory.policy.models import save_model
from safactory.policy.random import RandomPolicy
from safactory.policy.specs import make_policy
from safactory.sim.agent import EpisodeLimits
from safactory.sim.env import EnvEntry, EnvRegistry, EnvSpec
from safactory.sim.envs.arith import SPEC as ARITH_SPEC
from safactory.sim.envs.arith import ArithEnv, ArithExpert, ArithTasks
from safactory.sim.envs.http import HttpEnv
from safactory.sim.runner import RolloutRunner, StartRetry
from safactory.types import Message, Observation, StepResult, Task, ToolCall, ToolSpec, Trajectory

FAST_RETRY = StartRetry(attempts=3, backoff_s=0.001, max_backoff_s=0.002)


def cli() -> typer.Typer:
    app = typer.Typer(add_completion=False)
    app.command("rollout")(rollout_command)

    @app.command("noop")
    def noop() -> None:
        """A second command, so that `rollout` is addressed by name as in the real CLI."""

    return app


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli(), ["rollout", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def stored(db: Path) -> tuple[TrajectoryStore, list[Trajectory]]:
    store = TrajectoryStore(f"sqlite:///{db}")
    return store, list(store.iter())


# ---- envs and policies that misbehave ----------------------------------------------------------


class Tracked:
    """Counts instances built and closed (class-level, reset per test)."""

    built = 0
    closed = 0
    stepping = 0

    @classmethod
    def reset_counts(cls) -> None:
        cls.built = cls.closed = cls.stepping = 0


class HangingEnv(Tracked):
    spec = EnvSpec(id="hang", version="0", max_turns=3)

    def __init__(self) -> None:
        type(self).built += 1

    async def reset(self, task: Task, seed: int) -> Observation:
        return Observation(messages=[Message(role="user", content="hi")])

    async def step(self, action: Message) -> StepResult:
        type(self).stepping += 1
        await asyncio.sleep(3600)
        return StepResult()

    async def close(self) -> None:
        type(self).closed += 1


class RaisingEnv(HangingEnv):
    spec = EnvSpec(id="raise", version="0", max_turns=3)

    async def step(self, action: Message) -> StepResult:
        raise ValueError("simulator crashed")


class FlakyEnv(ArithEnv):
    """An arith env whose reset fails with a connection error for the first `failures` calls in all."""

    failures = 2
    resets = 0
    error: type[Exception] = ConnectionError

    async def reset(self, task: Task, seed: int) -> Observation:
        type(self).resets += 1
        if type(self).resets <= type(self).failures:
            raise type(self).error("env server refused the connection")
        return await super().reset(task, seed)


class AlwaysCalc:
    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        return Completion(text="calc(1+1)", tool_calls=[ToolCall(id="c", name="calc", arguments={"expression": "1+1"})])


@pytest.fixture(autouse=True)
def _counts() -> None:
    for cls in (HangingEnv, RaisingEnv):
        cls.reset_counts()
    FlakyEnv.resets = 0


# ---- make_policy ------------------------------------------------------------------------------


def test_make_policy_specs(tmp_path: Path, tiny) -> None:
    registry = EnvRegistry()
    registry.register("arith", EnvEntry(factory=ArithEnv, tasks=ArithTasks, expert=ArithExpert, spec=ARITH_SPEC))
    registry.register("bare", EnvEntry(factory=HangingEnv, tasks=ArithTasks, expert=None, spec=HangingEnv.spec))
    arith = registry.get("arith")
    assert isinstance(make_policy("random", arith, 1), RandomPolicy)
    assert isinstance(make_policy("scripted", arith, 1), ArithExpert)
    with pytest.raises(ValueError, match="no scripted expert"):
        make_policy("scripted", registry.get("bare"), 0)
    endpoint = make_policy("openai:http://127.0.0.1:9/v1#tiny", arith, 0)
    assert isinstance(endpoint, EndpointPolicy) and endpoint.model == "tiny"
    save_model(*tiny, tmp_path / "model")
    assert isinstance(make_policy(str(tmp_path / "model"), arith, 0), LocalPolicy)
    with pytest.raises(ValueError, match="no such model directory"):
        make_policy(str(tmp_path / "missing"), arith, 0)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("gpt", arith, 0)
    with pytest.raises(ValueError):
        make_policy("openai:not-a-url", arith, 0)


def test_random_policy_exercises_error_paths() -> None:
    """Over many turns the random policy produces valid calls and every kind of malformed action."""
    policy = RandomPolicy(seed=3)
    tools = list(ARITH_SPEC.tools)
    messages = [Message(role="user", content="Compute 12+7*3.")]
    env = ArithEnv()
    seen: set[str] = set()

    async def go() -> None:
        task = ArithTasks().tasks("train", 1)[0]
        for _ in range(300):
            await env.reset(task, 0)
            completion = await policy.generate(messages, tools, SamplingParams())
            result = await env.step(
                Message(role="assistant", content=completion.text, tool_calls=completion.tool_calls)
            )
            for error in result.info.get("errors", []):
                seen.add(error.split(" ")[0] if error.startswith(("unknown", "no tool")) else error.split(":")[1][:8])
            if completion.parse_error:
                seen.add("parse_error")
            if not result.info.get("errors"):
                seen.add("valid")

    asyncio.run(go())
    assert {"valid", "unknown", "parse_error"} <= seen
    assert any(s.strip().startswith("missing") for s in seen)
    assert any(s.strip().startswith("bad") for s in seen)  # an unexpected extra argument


def test_group_plan_and_error_kind() -> None:
    assert group_plan(10, 4) == [4, 4, 2]
    assert group_plan(8, 4) == [4, 4]
    assert error_kind("env step failed: ValueError('simulator crashed')") == "env step failed: ValueError"
    assert error_kind("episode exceeded 1.0 s") == "episode exceeded 1.0 s"
    with pytest.raises(ValueError):
        RolloutJob(env="arith", policy="random", db="x", group_size=0)


# ---- the CLI -----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["random", "scripted"])
def test_rollout_command_stores_every_episode(tmp_path: Path, policy: str) -> None:
    db = tmp_path / "store.db"
    code, output = invoke(
        "--env", "arith", "--policy", policy, "--episodes", "10", "--concurrency", "4",
        "--group-size", "4", "--db", str(db), "--seed", "7",
    )  # fmt: skip
    assert code == 0, output
    for label in ("episodes", "success rate", "mean reward", "termination: terminated", "episodes/s"):
        assert label in output
    assert "10 of 10" in output
    store, trajs = stored(db)
    assert len(trajs) == 10 and verify(store).ok
    (run_id,) = store.run_ids()
    assert run_id.startswith("rollout-") and all(t.run_id == run_id for t in trajs)
    assert store.run_info(run_id)["config"]
    assert sorted(len(g) for g in _groups(trajs)) == [2, 4, 4]  # 10 episodes in groups of 4: 4 + 4 + 2
    assert all(t.task.split == "test" and t.tags["attempts"] == 1 for t in trajs)
    assert all(t.provenance["policy"] == policy for t in trajs)
    if policy == "scripted":
        assert all(t.success for t in trajs)
    else:
        assert any(s.error or s.info.get("errors") for t in trajs for s in t.steps)
    store.close()


def _groups(trajs: list[Trajectory]) -> list[list[Trajectory]]:
    by_group: dict[str, list[Trajectory]] = {}
    for traj in trajs:
        by_group.setdefault(traj.group_id, []).append(traj)
    for group in by_group.values():
        assert len({t.task.id for t in group}) == 1
    return list(by_group.values())


def test_rollout_command_with_a_saved_tiny_model(tmp_path: Path, tiny) -> None:
    save_model(*tiny, tmp_path / "model")
    db = tmp_path / "runs"
    db.mkdir()
    code, output = invoke(
        "--env", "arith", "--policy", str(tmp_path / "model"), "--episodes", "4", "--concurrency", "4",
        "--db", str(db), "--max-turns", "2", "--max-tokens", "12", "--temperature", "1.0",
    )  # fmt: skip
    assert code == 0, output
    store, trajs = stored(db / "store.db")
    assert len(trajs) == 4 and verify(store).ok
    assert all(1 <= len(t.steps) <= 2 for t in trajs)
    assert all(s.trace is not None and s.trace.logprobs for t in trajs for s in t.steps)
    store.close()
    code, output = invoke(
        "--env", "arith", "--policy", str(tmp_path / "model"), "--episodes", "4", "--db", str(tmp_path / "b.db"),
        "--max-turns", "4", "--max-tokens", "12", "--max-total-tokens", "15",
    )  # fmt: skip
    assert code == 0, output
    store, trajs = stored(tmp_path / "b.db")
    assert all(sum(len(s.trace.completion_ids) for s in t.steps) <= 15 for t in trajs)
    assert any(t.termination == "token_limit" for t in trajs) or all(len(t.steps) == 1 for t in trajs)
    store.close()


def test_rollout_command_rejects_bad_input(tmp_path: Path) -> None:
    db = str(tmp_path / "store.db")
    code, output = invoke("--env", "nope", "--policy", "random", "--db", db)
    assert code != 0 and "unknown environment" in output
    code, output = invoke("--env", "arith", "--policy", "gpt", "--db", db)
    assert code != 0 and "unknown policy" in output
    code, output = invoke("--env", "arith", "--policy", "random", "--db", db, "--split", "validation")
    assert code != 0 and "validation" in output


def test_rollout_runs_on_when_episodes_fail(tmp_path: Path) -> None:
    """Through rollout(): an env that raises on some steps; every episode stored with its reason."""
    count = {"n": 0}

    def sometimes_broken() -> ArithEnv | RaisingEnv:
        count["n"] += 1
        return RaisingEnv() if count["n"] % 3 == 0 else ArithEnv()

    registry = EnvRegistry()
    registry.register("mixed", EnvEntry(factory=sometimes_broken, tasks=ArithTasks, expert=ArithExpert))
    config = RolloutJob(env="mixed", policy="scripted", db=str(tmp_path / "s.db"), episodes=9, concurrency=3)
    summary = asyncio.run(rollout(config, registry=registry))
    assert summary.episodes == summary.stored == 9
    assert summary.terminations["env_error"] == 3 and summary.terminations["terminated"] == 6
    assert summary.errors["env step failed: ValueError"] == 3
    store, trajs = stored(tmp_path / "s.db")
    assert len(trajs) == 9 and verify(store).ok
    store.close()


# ---- the runner: failures, retries, cancellation -------------------------------------------------


def test_raising_and_hanging_envs_are_stored_with_their_reasons(tmp_path: Path) -> None:
    envs = [ArithEnv, RaisingEnv, HangingEnv]
    count = {"n": 0}

    def factory() -> ArithEnv | HangingEnv:
        count["n"] += 1
        return envs[count["n"] % 3]()

    async def go() -> list[list[Trajectory]]:
        store = TrajectoryStore(f"sqlite:///{tmp_path / 'store.db'}")
        store.create_run("r", {})
        writer = StoreWriter(store)
        limits = EpisodeLimits(env_timeout_s=0.05)
        runner = RolloutRunner(factory, ArithExpert(), limits=limits, concurrency=4, run_id="r")
        groups = await runner.run_groups(ArithTasks().tasks("train", 4), 3, SamplingParams(), on_group=writer.put)
        await writer.close()
        store.close()
        return groups

    groups = asyncio.run(go())
    assert sum(len(g) for g in groups) == 12
    store, trajs = stored(tmp_path / "store.db")
    assert len(trajs) == 12 and verify(store).ok
    by_env: dict[str, list[Trajectory]] = {}
    for traj in trajs:
        by_env.setdefault(traj.env_id, []).append(traj)
    assert all(t.termination == "terminated" and t.success for t in by_env["arith"])
    assert all(t.termination == "env_error" and "simulator crashed" in t.error for t in by_env["raise"])
    assert all(t.termination == "env_timeout" and t.error and t.steps[0].error for t in by_env["hang"])
    assert HangingEnv.closed + RaisingEnv.closed == HangingEnv.built + RaisingEnv.built == 8
    store.close()


def test_start_retries_on_connection_errors() -> None:
    task = ArithTasks().tasks("train", 1)[0]

    def run(env: type, retry: StartRetry) -> tuple[Trajectory, RolloutRunner]:
        runner = RolloutRunner(env, ArithExpert(), limits=EpisodeLimits(), retry=retry)
        return asyncio.run(runner.run_group(task, 1, SamplingParams()))[0], runner

    traj, runner = run(FlakyEnv, FAST_RETRY)  # fails twice, then works
    assert traj.success and traj.termination == "terminated" and traj.tags["attempts"] == 3
    assert runner.start_retries == 2 and FlakyEnv.resets == 3

    FlakyEnv.resets = 0
    traj, _ = run(FlakyEnv, StartRetry(attempts=2, backoff_s=0.001))  # bounded: gives up after two
    assert traj.termination == "env_error" and "ConnectionError" in traj.error and traj.tags["attempts"] == 2

    class Broken(FlakyEnv):  # not an infrastructure error: never retried
        error = ValueError

    FlakyEnv.resets = 0
    traj, runner = run(Broken, FAST_RETRY)
    assert traj.termination == "env_error" and traj.tags["attempts"] == 1 and runner.start_retries == 0


def test_retry_errors_inside_an_episode_are_not_retried() -> None:
    task = ArithTasks().tasks("train", 1)[0]
    runner = RolloutRunner(RaisingEnv, AlwaysCalc(), limits=EpisodeLimits(), retry=FAST_RETRY)
    traj = asyncio.run(runner.run_group(task, 1, SamplingParams()))[0]
    assert traj.termination == "env_error" and traj.tags["attempts"] == 1 and RaisingEnv.built == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_retries_against_an_env_server_that_is_down() -> None:
    """A real HttpEnv pointed at a closed loopback port: RemoteEnvUnavailable at reset, retried, then recorded."""
    url = f"http://127.0.0.1:{_free_port()}"

    def factory() -> HttpEnv:
        return HttpEnv(url, spec=ARITH_SPEC, connect_retries=0, backoff_s=0.0, timeout_s=5.0)

    task = ArithTasks().tasks("train", 1)[0]
    runner = RolloutRunner(factory, ArithExpert(), limits=EpisodeLimits(), retry=FAST_RETRY)
    traj = asyncio.run(runner.run_group(task, 1, SamplingParams()))[0]
    assert traj.termination == "env_error" and "RemoteEnvUnavailable" in traj.error
    assert traj.tags["attempts"] == 3


def test_env_that_cannot_be_built_is_retried_then_recorded() -> None:
    calls = {"n": 0}

    def factory() -> ArithEnv:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionRefusedError("no env host")
        raise RuntimeError("bad env config")

    task = ArithTasks().tasks("train", 1)[0]
    runner = RolloutRunner(factory, ArithExpert(), limits=EpisodeLimits(), retry=StartRetry(5, 0.001))
    traj = asyncio.run(runner.run_group(task, 1, SamplingParams()))[0]
    assert traj.termination == "env_error" and "bad env config" in traj.error and traj.tags["attempts"] == 3
    assert traj.env_id == task.env_id and not traj.steps


@pytest.mark.parametrize("entry", ["run_groups", "stream"])
def test_cancelling_closes_every_env_in_flight(entry: str) -> None:
    tasks = ArithTasks().tasks("train", 4)
    finished: list[Trajectory] = []

    async def go() -> None:
        runner = RolloutRunner(HangingEnv, AlwaysCalc(), limits=EpisodeLimits(env_timeout_s=3600), concurrency=16)
        if entry == "run_groups":
            job = asyncio.create_task(runner.run_groups(tasks, 3, SamplingParams()))
        else:
            from safactory.sim.runner import Admission

            async def sink(group: list[Trajectory]) -> None:
                finished.extend(group)

            admission = Admission(groups_per_batch=100, eta=0, version=lambda: 0)
            job = asyncio.create_task(runner.stream(iter(tasks), 3, SamplingParams(), admission, sink))
        while HangingEnv.stepping < 12:
            await asyncio.sleep(0.01)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job

    asyncio.run(go())
    assert HangingEnv.built == HangingEnv.closed == 12
    assert not finished


def test_progress_callback_sees_every_episode() -> None:
    seen: list[str] = []
    runner = RolloutRunner(ArithEnv, ArithExpert(), limits=EpisodeLimits(), on_episode=lambda t: seen.append(t.id))
    groups = asyncio.run(runner.run_groups(ArithTasks().tasks("train", 3), 2, SamplingParams()))
    assert sorted(seen) == sorted(t.id for g in groups for t in g) and len(seen) == 6


def test_bounded_awaits_like_wait_for() -> None:
    """The agent's timer-free fast path: same results, errors, timeouts and cancellation as asyncio.wait_for."""
    from safactory.sim.agent import bounded

    async def instant() -> int:
        return 1

    async def suspends(value: int) -> int:
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        return value

    async def fails_later() -> int:
        await asyncio.sleep(0)
        raise ValueError("late")

    async def forever() -> int:
        await asyncio.sleep(3600)
        return 0

    async def go() -> None:
        assert await bounded(instant(), 1.0) == 1
        assert await bounded(suspends(2), 1.0) == 2
        assert await bounded(suspends(3), None) == 3
        assert await bounded(asyncio.ensure_future(suspends(4)), 1.0) == 4  # not a coroutine: wait_for
        with pytest.raises(ValueError, match="late"):
            await bounded(fails_later(), 1.0)
        with pytest.raises(TimeoutError):
            await bounded(forever(), 0.01)
        job = asyncio.create_task(bounded(forever(), 3600))
        await asyncio.sleep(0.01)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        with pytest.raises(TimeoutError):  # an enclosing deadline still wins over a longer inner one
            async with asyncio.timeout(0.01):
                await bounded(forever(), 3600)

    asyncio.run(go())


def test_a_small_task_file_gone_round_again_gets_other_seeds(tmp_path: Path) -> None:
    class TwoTasks(ArithTasks):
        def tasks(self, split: str, n: int) -> list[Task]:
            return super().tasks(split, 2)

    registry = EnvRegistry()
    registry.register("two", EnvEntry(factory=ArithEnv, tasks=TwoTasks, expert=ArithExpert))
    config = RolloutJob(env="two", policy="scripted", db=str(tmp_path / "s.db"), episodes=8, group_size=2)
    summary = asyncio.run(rollout(config, registry=registry))
    assert summary.stored == 8 and summary.tasks == 2
    store, trajs = stored(tmp_path / "s.db")
    assert len({t.task.id for t in trajs}) == 2 and len({(t.task.id, t.seed) for t in trajs}) == 8
    store.close()


def test_a_rollout_in_which_every_episode_failed_exits_non_zero(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, output = invoke(
        "--env", "arith", "--policy", f"openai:http://127.0.0.1:{port}/v1#m", "--episodes", "2",
        "--db", str(tmp_path / "s.db"),
    )  # fmt: skip
    assert code == 1 and "every episode ended in an error" in output
    store, trajs = stored(tmp_path / "s.db")  # still stored, with their reasons
    assert len(trajs) == 2 and all(t.termination == "policy_error" for t in trajs)
    store.close()


def test_rollout_summary_shows_the_unsafe_rate_where_the_env_labels_actions(tmp_path: Path) -> None:
    from safactory.jobs.rollout import RolloutJob, RolloutSummary, rollout

    summary = asyncio.run(
        rollout(RolloutJob(env="ops", policy="random", db=str(tmp_path / "ops.db"), episodes=12, seed=3))
    )
    assert summary.labelled == 12 and summary.unsafe_rate is not None
    store, trajs = stored(tmp_path / "ops.db")
    assert summary.unsafe == sum(any(s.info.get("unsafe_actions") for s in t.steps) for t in trajs)
    code, output = invoke("--env", "ops", "--policy", "scripted", "--episodes", "4", "--db", str(tmp_path / "o2.db"))
    assert code == 0 and "unsafe-action rate" in output and "0.000 (0 of 4)" in output
    code, output = invoke("--env", "arith", "--policy", "scripted", "--episodes", "2", "--db", str(tmp_path / "a.db"))
    assert code == 0 and "unsafe-action rate" not in output  # arith labels nothing
    assert RolloutSummary().unsafe_rate is None
