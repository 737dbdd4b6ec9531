"""The `gym:` adapter: faithful to Gymnasium step for step, tolerant of bad actions, runnable end to end."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

gymnasium = pytest.importorskip("gymnasium")

from safactory.policy.base import Completion, SamplingParams  # noqa: E402
from safactory.sim.agent import EpisodeLimits, run_episode  # noqa: E402
from safactory.sim.env import EnvRegistry  # noqa: E402
from safactory.sim.envs import gym as gym_adapter  # noqa: E402
from safactory.sim.envs.gym import GymEnv, GymEnvError, jsonable, strip_ansi  # noqa: E402
from safactory.types import Message, StepResult, Task, ToolCall, ToolSpec  # noqa: E402

TAXI = next(i for i in ("Taxi-v4", "Taxi-v3") if i in gymnasium.registry)
CLIFF = next(i for i in ("CliffWalking-v1", "CliffWalking-v0") if i in gymnasium.registry)


def registry() -> EnvRegistry:
    reg = EnvRegistry()
    gym_adapter.register(reg)
    return reg


def act(action: Any, call_id: str = "c0") -> Message:
    return Message(role="assistant", tool_calls=[ToolCall(id=call_id, name="act", arguments={"action": action})])


def say(text: str) -> Message:
    return Message(role="assistant", content=text)


def as_message(action: int, names: tuple[str, ...], k: int) -> Message:
    """Vary the form of the same action: int tool call, numeric string, name, bare token, act(...) text."""
    form = k % 5
    if form == 0:
        return act(action)
    if form == 1:
        return act(str(action))
    if form == 2 and names:
        return act(names[action])
    if form == 3:
        return say(f" {names[action] if names else action} ")
    return say(f"act({action})")


def side_by_side(env_id: str, seed: int, actions_seed: int, steps: int = 400) -> int:
    """Run raw Gymnasium and the adapter with the same seed and actions; compare every step. Returns steps run."""
    entry = registry().get(f"gym:{env_id}")
    gym_id, kwargs = gym_adapter.parse_gym_id(env_id)
    raw = gymnasium.make(gym_id, **kwargs)
    raw_obs, _ = raw.reset(seed=seed)
    env = entry.factory()
    task = Task(id="t", env_id=entry.spec.id, split="train", prompt="play", data={"seed": seed})
    rng = random.Random(actions_seed)
    n = int(raw.action_space.n)

    async def go() -> int:
        obs = await env.reset(task, seed=12345)  # the runner's seed must not override the task's
        assert obs.info["observation"] == jsonable(raw_obs)
        names = env.profile.action_names
        for k in range(steps):
            a = rng.randrange(n)
            raw_obs2, r, term, trunc, _ = raw.step(a)
            result: StepResult = await env.step(as_message(a, names, k))
            assert result.info["action"] == a, result.info
            assert result.reward == float(r)
            assert (result.terminated, result.truncated) == (bool(term), bool(trunc))
            assert result.info["observation"] == jsonable(raw_obs2)
            assert "errors" not in result.info
            if term or trunc:
                return k + 1
        return steps

    try:
        return asyncio.run(go())
    finally:
        raw.close()
        asyncio.run(env.close())


@pytest.mark.parametrize(
    "env_id",
    [TAXI, CLIFF, "FrozenLake-v1", "Blackjack-v1", "CartPole-v1", f"{CLIFF}?max_episode_steps=7"],
)
def test_reproduces_gymnasium_rewards_and_flags(env_id):
    ran = [side_by_side(env_id, seed, actions_seed=seed + 100) for seed in (0, 1, 7)]
    assert all(k >= 1 for k in ran)
    if env_id.endswith("max_episode_steps=7"):
        assert max(ran) <= 7


def test_truncation_comes_from_gymnasium():
    steps = side_by_side(f"{CLIFF}?max_episode_steps=3", seed=0, actions_seed=0, steps=10)
    assert steps <= 3
    spec = registry().get(f"gym:{CLIFF}?max_episode_steps=3").spec
    assert spec.max_turns == 3


def test_spec_tools_and_limits():
    reg = registry()
    taxi = reg.get(f"gym:{TAXI}")
    assert taxi.spec.id == f"gym:{TAXI}" and taxi.spec.max_turns == 200
    (tool,) = taxi.spec.tools
    assert tool.name == "act" and tool.param_names() == ["action"]
    assert "pickup" in tool.parameters["properties"]["action"]["description"]
    assert reg.get(f"gym:{CLIFF}").spec.max_turns == gym_adapter.DEFAULT_MAX_TURNS  # no max_episode_steps
    with pytest.raises(GymEnvError, match="Discrete"):
        reg.get("gym:MountainCarContinuous-v0")
    with pytest.raises(GymEnvError, match="cannot make"):
        reg.get("gym:NoSuchEnv-v9")
    with pytest.raises(GymEnvError, match="render_mode"):
        reg.get(f"gym:{TAXI}?render_mode=human")


def test_text_rendering_is_compact_and_readable():
    entry = registry().get(f"gym:{TAXI}")
    task = entry.tasks().tasks("train", 1)[0]
    env = entry.factory()
    obs = asyncio.run(env.reset(task, 0))
    text = obs.messages[0].content
    assert "\x1b" not in text and "@" in text  # colour codes gone, the cab marked
    assert "taxi at row" in text and "observation: " in text and "south" in text
    assert len(text) < 800
    assert strip_ansi("\x1b[41mS\x1b[0mFF\x1b[35mY\x1b[0m") == "@FFY"
    cart = registry().get("gym:CartPole-v1")
    env2 = cart.factory()
    text2 = asyncio.run(env2.reset(cart.tasks().tasks("train", 1)[0], 0)).messages[0].content
    assert "observation: [0.0137, " in text2 and len(text2) < 400


def test_invalid_actions_are_error_observations_and_take_no_step():
    entry = registry().get(f"gym:{TAXI}")
    task = entry.tasks().tasks("train", 1)[0]
    raw = gymnasium.make(TAXI)
    raw.reset(seed=task.data["seed"])

    async def go() -> list[StepResult]:
        env = entry.factory()
        await env.reset(task, 0)
        bad = [
            await env.step(say("fly")),
            await env.step(say("I think I should go north")),
            await env.step(say("")),
            await env.step(act(6)),
            await env.step(act(-1)),
            await env.step(act(True)),
            await env.step(act(None)),
            await env.step(act({"x": 1})),
            await env.step(Message(role="assistant", tool_calls=[ToolCall(id="u", name="teleport", arguments={})])),
            await env.step(Message(role="assistant", tool_calls=[ToolCall(id="e", name="act", arguments={})])),
        ]
        # two calls in one turn: the first act runs, the second is refused; each call gets its reply in order
        two = await env.step(
            Message(
                role="assistant",
                tool_calls=[
                    ToolCall(id="x", name="look", arguments={}),
                    ToolCall(id="a", name="act", arguments={"action": "north"}),
                    ToolCall(id="b", name="act", arguments={"action": "south"}),
                ],
            )
        )
        await env.close()
        await env.close()  # idempotent
        return bad + [two]

    *bad, two = asyncio.run(go())
    for result in bad:
        assert result.info["invalid_action"] is True and result.info["errors"]
        assert result.reward == -1.0 and not result.terminated and not result.truncated
        assert result.messages and result.messages[0].content.startswith("error:")
    assert "unknown action 'fly'" in bad[0].messages[0].content and bad[0].messages[0].role == "user"
    assert "out of range" in bad[3].messages[0].content and bad[3].messages[0].role == "tool"
    assert "unknown tool 'teleport'" in bad[8].messages[0].content and bad[8].messages[0].tool_call_id == "u"
    # the valid action is the first env step: it matches Gymnasium's first step
    _, r, term, trunc, _ = raw.step(1)
    assert two.reward == float(r) and (two.terminated, two.truncated) == (term, trunc)
    assert [m.tool_call_id for m in two.messages] == ["x", "a", "b"]
    assert two.messages[1].content.endswith("reward: -1") and two.messages[2].content.startswith("error: one action")
    assert two.info["errors"]


def test_step_after_end_and_before_reset():
    entry = registry().get(f"gym:{CLIFF}?max_episode_steps=1")
    env = entry.factory()
    with pytest.raises(RuntimeError):
        asyncio.run(env.step(act(0)))

    async def go() -> tuple[StepResult, StepResult]:
        await env.reset(entry.tasks().tasks("test", 1)[0], 0)
        first = await env.step(act("up"))
        return first, await env.step(act("up"))

    first, after = asyncio.run(go())
    assert first.truncated and "episode over (truncated)" in first.messages[0].content
    assert after.terminated and after.messages[0].content.startswith("error: episode is over")


def test_tasks_are_seeds_with_disjoint_splits():
    source = registry().get(f"gym:{TAXI}").tasks()
    train = source.tasks("train", 300)
    test = source.tasks("test", 300)
    train_seeds = {t.data["seed"] for t in train}
    test_seeds = {t.data["seed"] for t in test}
    assert len(train_seeds) == 300 and len(test_seeds) == 300 and not train_seeds & test_seeds
    assert [t.id for t in source.tasks("test", 5)] == [t.id for t in test[:5]]
    assert all(t.env_id == f"gym:{TAXI}" and t.split == "train" for t in train)
    shifted = registry().get(f"gym:{TAXI}").tasks(seed=50).tasks("train", 3)
    assert [t.data["seed"] for t in shifted] == [50, 51, 52]
    with pytest.raises(ValueError):
        source.tasks("validation", 1)
    with pytest.raises(ValueError):
        source.tasks("train", gym_adapter.SPLIT_STRIDE + 1)


@pytest.mark.parametrize("env_id", [TAXI, CLIFF, "FrozenLake-v1?is_slippery=false"])
def test_scripted_expert_solves_deterministic_tabular_envs(env_id):
    entry = registry().get(f"gym:{env_id}")
    assert entry.expert is not None
    tasks = entry.tasks().tasks("test", 4)

    async def go() -> list:
        return list(
            await asyncio.gather(
                *(
                    run_episode(
                        entry.factory,
                        entry.expert(),
                        t,
                        seed=i,
                        sampling=SamplingParams(),
                        limits=EpisodeLimits(max_turns=200, timeout_s=60),
                    )
                    for i, t in enumerate(tasks)
                )
            )
        )

    trajs = asyncio.run(go())
    assert all(t.termination == "terminated" and t.success for t in trajs), [t.termination for t in trajs]
    if env_id == CLIFF:
        assert all(t.reward == -13.0 and len(t.steps) == 13 for t in trajs)  # the optimal path
    if env_id == TAXI:
        assert all(t.steps[-1].reward == 20.0 for t in trajs)


def test_env_built_directly_from_a_gym_id():
    env = GymEnv("FrozenLake-v1?is_slippery=false&map_name=8x8", invalid_action_reward=0.0)
    assert env.spec.id == "gym:FrozenLake-v1?is_slippery=false&map_name=8x8"
    assert env.profile.make_kwargs == {"is_slippery": False, "map_name": "8x8"}
    task = Task(id="t", env_id=env.spec.id, split="train", prompt="go", data={})
    result = asyncio.run(_reset_then(env, task, say("?")))
    assert result.reward == 0.0 and result.info["invalid_action"]


async def _reset_then(env: GymEnv, task: Task, action: Message) -> StepResult:
    obs = await env.reset(task, seed=3)
    assert obs.info["seed"] == 3  # without a task seed, the runner's seed is used
    try:
        return await env.step(action)
    finally:
        await env.close()


def test_no_expert_for_stochastic_or_continuous_envs():
    assert registry().get("gym:FrozenLake-v1").expert is None  # slippery by default
    assert registry().get("gym:CartPole-v1").expert is None


class PlainTokenPolicy:
    """Answers with a bare action name in the content, no tool call (as a small model would)."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = list(tokens)

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        return Completion(text=self.tokens.pop(0) if self.tokens else "noop")


def test_plain_token_episode_through_run_episode():
    entry = registry().get(f"gym:{CLIFF}")
    task = entry.tasks().tasks("train", 1)[0]
    path = ["up"] + ["right"] * 11 + ["down"]
    traj = asyncio.run(
        run_episode(
            entry.factory,
            PlainTokenPolicy(["hop", *path]),
            task,
            seed=0,
            sampling=SamplingParams(),
            limits=EpisodeLimits(max_turns=50),
        )
    )
    assert traj.termination == "terminated" and traj.success
    assert traj.steps[0].info["invalid_action"] and traj.steps[0].reward == -1.0
    assert traj.reward == -14.0 and len(traj.steps) == 14
    assert (
        traj.steps[-1].observation[0].role == "user"
        and "episode over (terminated)" in traj.steps[-1].observation[0].content
    )
    assert traj.tools[0].name == "act"


async def _play(env_id: str, rule: Any) -> StepResult:
    """Run `rule(observation) -> action` on GymEnv until the episode ends; the last step."""
    env = GymEnv(env_id)
    task = Task(id="t", env_id=env.spec.id, split="train", prompt="play", data={"seed": 0})
    try:
        obs = (await env.reset(task, 0)).info["observation"]
        while True:
            result = await env.step(act(rule(obs)))
            obs = result.info["observation"]
            if result.terminated or result.truncated:
                return result
    finally:
        await env.close()


def test_classic_control_success_is_reaching_the_goal_not_the_reward() -> None:
    balance = lambda o: 1 if o[2] + 0.5 * o[3] > 0 else 0  # noqa: E731 - keeps the pole up
    pump = lambda o: 2 if o[1] >= 0 else 0  # noqa: E731 - push with the velocity: reaches the flag
    swing = lambda o: 2 if o[5] > 0 else 0  # noqa: E731 - torque with the joint velocity: swings up
    cases = [
        ("CartPole-v1", lambda o: 0, "terminated", False),  # the pole falls: reward 1.0, a failure
        ("CartPole-v1?max_episode_steps=30", balance, "truncated", True),  # balanced to the time limit
        ("MountainCar-v0", pump, "terminated", True),  # the goal: reward -1.0, a success
        ("MountainCar-v0?max_episode_steps=20", pump, "truncated", False),
        ("Acrobot-v1", swing, "terminated", True),  # the goal: reward 0.0
        ("Acrobot-v1?max_episode_steps=20", swing, "truncated", False),
    ]
    for env_id, rule, ending, success in cases:
        last = asyncio.run(_play(env_id, rule))
        assert (last.terminated, last.truncated) == (ending == "terminated", ending == "truncated"), env_id
        assert last.info["success"] is success, env_id
