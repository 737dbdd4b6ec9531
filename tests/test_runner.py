import asyncio

import pytest

from safactory.policy.base import Completion, SamplingParams
from safactory.sim.agent import EpisodeLimits, run_episode
from safactory.sim.env import EnvSpec
from safactory.sim.envs.arith import ArithEnv, ArithExpert
from safactory.sim.runner import Admission, RolloutRunner
from safactory.types import Message, Observation, Step, StepResult, ToolCall, Trajectory


class AlwaysCalc:
    """A policy that never answers: episodes end by the turn limit."""

    async def generate(self, messages, tools, sampling):
        return Completion(text="calc(1+1)", tool_calls=[ToolCall(id="c", name="calc", arguments={"expression": "1+1"})])


class Broken:
    async def generate(self, messages, tools, sampling):
        raise RuntimeError("backend down")


class Garbage:
    async def generate(self, messages, tools, sampling):
        return Completion(text="%%%", parse_error="not a tool call: '%%%'")


class Invalid:
    """Returns replies that do not validate: no text, or a token trace whose ids are not ints."""

    def __init__(self):
        self.calls = 0

    async def generate(self, messages, tools, sampling):
        self.calls += 1
        if self.calls % 2:
            return Completion.model_construct(text=None, tool_calls=[])
        bad_trace = {"token_ids": ["x"], "prompt_ids": [1], "logprobs": [0.0]}
        return Completion.model_construct(text="calc(1)", tool_calls=[], **bad_trace)


class HangingEnv:
    spec = EnvSpec(id="hang", version="0", max_turns=3)

    async def reset(self, task, seed):
        return Observation(messages=[Message(role="user", content="hi")])

    async def step(self, action):
        await asyncio.sleep(3600)
        return StepResult()

    async def close(self):
        return None


class RaisingEnv(HangingEnv):
    async def step(self, action):
        raise ValueError("simulator crashed")


def episode(env_factory, policy, task, **limits):
    return asyncio.run(
        run_episode(env_factory, policy, task, seed=0, sampling=SamplingParams(), limits=EpisodeLimits(**limits))
    )


def test_groups_share_a_task_and_group_id_with_distinct_seeds(arith_tasks):
    tasks = arith_tasks.tasks("train", 5)
    runner = RolloutRunner(ArithEnv, ArithExpert(), limits=EpisodeLimits(), concurrency=3, run_id="r")
    groups = asyncio.run(runner.run_groups(tasks, 4, SamplingParams()))
    assert len(groups) == 5 and all(len(g) == 4 for g in groups)
    for task, group in zip(tasks, groups, strict=True):
        assert {t.task.id for t in group} == {task.id}
        assert len({t.group_id for t in group}) == 1
        assert len({t.seed for t in group}) == 4
        assert all(t.run_id == "r" and t.success for t in group)
    assert len({g[0].group_id for g in groups}) == 5
    assert runner.episodes_done == 20


def test_turn_limit(arith_tasks):
    task = arith_tasks.tasks("train", 1)[0]
    traj = episode(ArithEnv, AlwaysCalc(), task, max_turns=2)
    assert len(traj.steps) == 2 and traj.termination == "max_turns" and not traj.success
    traj = episode(ArithEnv, AlwaysCalc(), task, max_turns=10)
    assert len(traj.steps) == 4 and traj.termination == "truncated"  # the env's own limit of 4


def test_malformed_output_is_an_error_observation(arith_tasks):
    task = arith_tasks.tasks("train", 1)[0]
    traj = episode(ArithEnv, Garbage(), task)
    assert traj.termination == "truncated" and len(traj.steps) == 4
    assert all(s.error and s.observation[0].content.startswith("error:") for s in traj.steps)


def test_failures_end_the_episode_with_a_reason(arith_tasks):
    task = arith_tasks.tasks("train", 1)[0]
    traj = episode(ArithEnv, Broken(), task)
    assert traj.termination == "policy_error" and "backend down" in traj.error
    traj = episode(RaisingEnv, AlwaysCalc(), task)
    assert traj.termination == "env_error" and "simulator crashed" in traj.steps[0].error
    # a reply that does not validate ends that episode with a reason; the group still completes
    runner = RolloutRunner(ArithEnv, Invalid(), limits=EpisodeLimits(), concurrency=2, run_id="r")
    (group,) = asyncio.run(runner.run_groups([task], 4, SamplingParams()))
    assert len(group) == 4
    assert all(t.termination == "policy_error" and "invalid completion" in t.error for t in group)
    traj = episode(HangingEnv, AlwaysCalc(), task, env_timeout_s=0.05)
    assert traj.termination == "env_timeout" and len(traj.steps) == 1
    traj = episode(HangingEnv, AlwaysCalc(), task, timeout_s=0.05, env_timeout_s=100)
    assert traj.termination == "timeout"


def test_token_limit(policy, arith_tasks):
    task = arith_tasks.tasks("train", 1)[0]
    traj = episode(ArithEnv, policy, task, max_tokens_per_turn=8, max_total_tokens=12)
    total = sum(len(s.trace.completion_ids) for s in traj.steps)
    assert total <= 12
    assert traj.termination in {"token_limit", "terminated", "truncated"}


def test_admission_never_exceeds_the_staleness_bound(arith_tasks):
    """The trainer steps at its own pace; every group must be admitted at most eta versions early."""

    class Recording(Admission):
        admitted: list[int] = []

        async def acquire(self):
            await super().acquire()
            self.admitted.append(self.version())

    async def go(eta):
        state = {"version": 0}
        admission = Recording(groups_per_batch=3, eta=eta, version=lambda: state["version"])
        admission.admitted = []
        runner = RolloutRunner(ArithEnv, ArithExpert(), limits=EpisodeLimits(), concurrency=8)
        finished: asyncio.Queue = asyncio.Queue()

        async def sink(group):
            await finished.put(group)

        producer = asyncio.create_task(
            runner.stream(iter(arith_tasks.tasks("train", 60)), 2, SamplingParams(), admission, sink)
        )
        for _ in range(6):  # six trainer steps of 3 groups each
            for _ in range(3):
                await finished.get()
            await asyncio.sleep(0.01)  # rollouts run on meanwhile, as far as admission lets them
            state["version"] += 1
            admission.notify()
        await asyncio.sleep(0.01)
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        return admission.admitted

    for eta in (0, 2):
        admitted = asyncio.run(go(eta))
        # group k (0-based) is trained at version k // 3; it must not start before version k // 3 - eta
        assert all(k // 3 - v <= eta for k, v in enumerate(admitted))
        assert len(admitted) == 3 * (6 + eta + 1)  # admission ran exactly to the bound, no further


# ---- the deferred step records, the timer-free episode limit, stream failures ------------------


class ScriptedEnv:
    """Answers each step from a list of StepResults (the last one terminates)."""

    spec = EnvSpec(id="scripted", version="0", max_turns=10)

    def __init__(self, results):
        self.results = list(results)
        self.closed = False

    async def reset(self, task, seed):
        return Observation(messages=[Message(role="user", content="hi")])

    async def step(self, action):
        return self.results.pop(0)

    async def close(self):
        self.closed = True


def reply(text, **fields):
    return StepResult(messages=[Message(role="tool", content=text, tool_call_id="c", name="calc")], **fields)


def test_steps_are_validated_records_of_what_happened_then(arith_tasks):
    """Steps are kept as plain fields until the end; the env changing its answers later must not leak in."""
    task = arith_tasks.tasks("train", 1)[0]
    first = reply("one", reward=0.25, info={"n": 1})
    env = ScriptedEnv([first, reply("two", reward=0.5), reply("three", reward=1.0, terminated=True)])
    traj = asyncio.run(
        run_episode(
            lambda: env, AlwaysCalc(), task, seed=0, sampling=SamplingParams(), limits=EpisodeLimits(max_turns=5)
        )
    )
    first.messages.append(Message(role="tool", content="late"))  # after the episode: not in the record
    first.info["n"] = 2
    assert traj.termination == "terminated" and traj.success and env.closed
    assert [s.index for s in traj.steps] == [0, 1, 2]
    assert all(isinstance(s, Step) and isinstance(s.action, Message) for s in traj.steps)
    assert [s.observation[0].content for s in traj.steps] == ["one", "two", "three"]
    assert len(traj.steps[0].observation) == 1 and traj.steps[0].info == {"n": 1}
    assert traj.reward == 1.75
    assert traj.steps[0].action.tool_calls[0].name == "calc" and traj.task_hash == task.hash()
    assert Trajectory.model_validate(traj.model_dump()) == traj  # a valid record through and through


def test_a_step_that_does_not_validate_ends_the_episode_as_an_env_error(arith_tasks):
    """An env answering with unvalidated garbage: recorded as if the episode had stopped at that step."""
    task = arith_tasks.tasks("train", 1)[0]
    bad = StepResult.model_construct(messages=["not a message"], reward=0.0, terminated=False, truncated=False, info={})
    env = ScriptedEnv([reply("one", reward=1.0), bad, reply("three", terminated=True)])
    traj = asyncio.run(
        run_episode(
            lambda: env, AlwaysCalc(), task, seed=0, sampling=SamplingParams(), limits=EpisodeLimits(max_turns=5)
        )
    )
    assert traj.termination == "env_error" and not traj.success and env.closed
    assert len(traj.steps) == 2 and traj.steps[0].observation[0].content == "one"
    assert traj.steps[1].observation == [] and traj.steps[1].error.startswith(
        "env step failed: 1 validation error for Step"
    )
    assert traj.error == traj.steps[1].error and traj.reward == 1.0


def test_episode_limits_without_and_with_a_wait(arith_tasks):
    task = arith_tasks.tasks("train", 1)[0]
    traj = episode(ArithEnv, AlwaysCalc(), task, max_total_tokens=0)
    assert traj.termination == "token_limit" and not traj.steps

    class SlowPolicy(AlwaysCalc):  # the episode only waits in the policy: the episode's time limit still holds
        async def generate(self, messages, tools, sampling):
            await asyncio.sleep(3600)

    traj = episode(ArithEnv, SlowPolicy(), task, timeout_s=0.05)
    assert traj.termination == "timeout" and not traj.steps and "exceeded" in traj.error

    class Waits(AlwaysCalc):  # suspends every turn, finishes in time
        async def generate(self, messages, tools, sampling):
            await asyncio.sleep(0)
            return await super().generate(messages, tools, sampling)

    traj = episode(ArithEnv, Waits(), task, max_turns=3, timeout_s=5)
    assert traj.termination == "max_turns" and len(traj.steps) == 3


def test_stream_raises_a_failing_sink_and_stops_admitting(arith_tasks):
    """A failed group is raised (never lost), no group is admitted after it is seen, the rest are cancelled."""
    tasks = arith_tasks.tasks("train", 20)

    async def go(blocking):
        state = {"version": 0}
        runner = RolloutRunner(ArithEnv, ArithExpert(), limits=EpisodeLimits(), concurrency=2)
        sunk = []

        async def sink(group):
            sunk.append(group)
            if len(sunk) == 2:
                raise OSError("disk full")

        admission = Admission(groups_per_batch=2 if blocking else 100, eta=0, version=lambda: state["version"])
        job = asyncio.create_task(runner.stream(iter(tasks), 2, SamplingParams(), admission, sink))
        # blocking: both admitted groups finish (one sink fails) while admission holds the stream,
        # and the version never moves (the trainer waits for those groups): it must raise anyway
        with pytest.raises(OSError, match="disk full"):
            await asyncio.wait_for(job, 60)
        return admission.started, runner.episodes_done

    started, done = asyncio.run(go(blocking=True))
    assert started == 2 and done == 4  # nothing was admitted after the failure
    asyncio.run(go(blocking=False))  # raised too when every group had finished before the stream looked


def test_rewards_and_info_the_store_cannot_hold_end_the_episode_as_an_env_error(arith_tasks):
    """A NaN reward or an info value JSON cannot hold is the env's fault; NumPy values are converted."""
    import numpy as np

    task = arith_tasks.tasks("train", 1)[0]

    def play(*results):
        env = ScriptedEnv(results)
        limits = EpisodeLimits(max_turns=5)
        return asyncio.run(
            run_episode(lambda: env, AlwaysCalc(), task, seed=0, sampling=SamplingParams(), limits=limits)
        )

    traj = play(reply("one", reward=0.5), reply("two", reward=float("nan")))
    assert traj.termination == "env_error" and "non-finite reward" in traj.error
    assert len(traj.steps) == 2 and traj.steps[0].reward == 0.5 and traj.reward == 0.5
    traj = play(reply("one", info={"what": object()}))
    assert traj.termination == "env_error" and "cannot be stored as JSON" in traj.error
    traj = play(reply("one", info={"p": np.float32(0.25), "mask": np.array([1, 0])}, terminated=True))
    assert traj.termination == "terminated" and traj.steps[0].info == {"p": 0.25, "mask": [1, 0]}


def test_a_truncated_episode_succeeds_only_where_the_env_says_so(arith_tasks):
    task = arith_tasks.tasks("train", 1)[0]
    for info, success in (({}, False), ({"success": True}, True)):
        env = ScriptedEnv([reply("balanced", reward=1.0, truncated=True, info=info)])
        traj = asyncio.run(
            run_episode(lambda e=env: e, AlwaysCalc(), task, seed=0, sampling=SamplingParams(), limits=EpisodeLimits())
        )
        assert traj.termination == "truncated" and traj.success is success


class UntracedTokens(AlwaysCalc):
    """Reports the ids it sampled but not its prompt's (as an endpoint that returns log-probs only may)."""

    async def generate(self, messages, tools, sampling):
        completion = await super().generate(messages, tools, sampling)
        return completion.model_copy(update={"token_ids": [7] * 40})


def test_the_total_token_budget_counts_turns_without_prompt_ids(arith_tasks):
    task = arith_tasks.tasks("train", 1)[0]
    env = ScriptedEnv([reply(str(i)) for i in range(5)])
    limits = EpisodeLimits(max_turns=5, max_tokens_per_turn=40, max_total_tokens=80)
    traj = asyncio.run(
        run_episode(lambda: env, UntracedTokens(), task, seed=0, sampling=SamplingParams(), limits=limits)
    )
    assert traj.termination == "token_limit" and len(traj.steps) == 2
    assert all(s.trace is None for s in traj.steps)
