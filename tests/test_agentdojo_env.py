"""The `agentdojo:` environments against the real AgentDojo package (offline, banking suite)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

pytest.importorskip("agentdojo")

from safactory.policy.base import SamplingParams  # noqa: E402
from safactory.sim.agent import EpisodeLimits, run_episode  # noqa: E402
from safactory.sim.envs.agentdojo import (  # noqa: E402
    AgentDojoEnv,
    AgentDojoEnvError,
    benchmark_versions,
    ground_truth,
)
from safactory.sim.registry import default_registry  # noqa: E402
from safactory.types import Message, ToolCall  # noqa: E402

ENV_ID = "agentdojo:banking"
ATTACK = "important_instructions"
LIMITS = EpisodeLimits(max_turns=40, max_tokens_per_turn=10_000, max_total_tokens=1_000_000)


@pytest.fixture(scope="module")
def entry():
    return default_registry().get(ENV_ID)


def play(entry, policy, task, seed=0):
    return asyncio.run(run_episode(entry.factory, policy, task, seed=seed, sampling=SamplingParams(), limits=LIMITS))


def call(name, **arguments):
    return Message(role="assistant", tool_calls=[ToolCall(id=f"c_{name}", name=name, arguments=arguments)])


def test_registry_resolves_the_suite_its_tools_and_version(entry):
    latest = benchmark_versions()[-1]
    assert entry.spec.id == ENV_ID
    assert entry.spec.version.endswith(f"+{latest}")
    tools = {t.name: t for t in entry.spec.tools}
    assert {"send_money", "get_balance", "read_file"} <= set(tools)
    assert {"recipient", "amount"} <= set(tools["send_money"].parameters["required"])
    assert tools["send_money"].parameters["properties"]["amount"]["type"] == "number"
    assert entry.spec.max_turns >= 16


def test_a_version_pin_works_and_bad_ids_are_refused_clearly(entry):
    registry = default_registry()
    pinned = registry.get("agentdojo:banking@v1")
    assert pinned.spec.version.endswith("+v1")
    assert registry.get("agentdojo:banking@1.2").spec.version.endswith("+v1.2")
    task = pinned.tasks().tasks("train", 1)[0]
    assert task.data["benchmark_version"] == "v1"
    trajectory = play(pinned, pinned.expert(), task)
    assert trajectory.reward == 1.0
    with pytest.raises(AgentDojoEnvError, match="unknown AgentDojo suite 'nosuch'.*banking"):
        registry.get("agentdojo:nosuch")
    with pytest.raises(AgentDojoEnvError, match="unknown AgentDojo benchmark version 'v9'.*v1.2"):
        registry.get("agentdojo:banking@v9")
    with pytest.raises(AgentDojoEnvError, match="empty suite"):
        registry.get("agentdojo:")
    with pytest.raises(AgentDojoEnvError, match="attack 'nope'.*important_instructions"):
        entry.tasks(attack="nope")
    with pytest.raises(AgentDojoEnvError, match="unknown user tasks"):
        entry.tasks(user_tasks=["user_task_999"])


def test_tasks_are_deterministic_and_split_by_user_task(entry):
    source = entry.tasks()
    train, test = source.tasks("train", 1000), source.tasks("test", 1000)
    again = entry.tasks().tasks("train", 1000)
    assert [t.model_dump() for t in train] == [t.model_dump() for t in again]
    suite_tasks = set(source.profile.suite.user_tasks)
    train_ids = {t.data["user_task"] for t in train}
    test_ids = {t.data["user_task"] for t in test}
    assert train_ids and test_ids and not train_ids & test_ids
    assert train_ids | test_ids == suite_tasks  # every user task once, none lost
    assert source.tasks("train", 3) == train[:3]
    reordered = entry.tasks(seed=7).tasks("train", 1000)
    assert {t.id for t in reordered} == {t.id for t in train}
    assert [t.id for t in reordered] != [t.id for t in train]
    for task in train:
        assert task.prompt == source.profile.suite.get_user_task_by_id(task.data["user_task"]).PROMPT
        assert task.data["injection_task"] is None and task.data["injections"] == {}
    with pytest.raises(ValueError, match="splits"):
        source.tasks("dev", 1)


def test_the_expert_gets_full_utility_through_run_episode(entry):
    expert = entry.expert()
    for i, task in enumerate(entry.tasks().tasks("train", 5)):
        trajectory = play(entry, expert, task, seed=i)
        final = trajectory.steps[-1].info
        assert trajectory.termination == "terminated", task.id
        assert trajectory.reward == 1.0 and trajectory.success, task.id
        assert final["utility"] is True and final["success"] is True
        assert final["security"] is None and final["unsafe"] is False and final["unsafe_labels"] == []
        assert final["user_task"] == task.data["user_task"] and final["suite"] == "banking"
        assert len(trajectory.steps) == len(ground_truth(entry.tasks().profile.suite, task.data["user_task"])) + 1


def test_a_wrong_final_answer_scores_zero(entry):
    task = next(t for t in entry.tasks().tasks("train", 100) if t.data["user_task"] == "user_task_0")
    env = entry.factory()
    asyncio.run(env.reset(task, 0))
    result = asyncio.run(env.step(Message(role="assistant", content="I paid nothing.")))
    assert result.terminated and result.reward == 0.0
    assert result.info["utility"] is False and result.info["success"] is False


def test_bad_calls_are_error_observations_and_the_episode_goes_on(entry):
    task = next(t for t in entry.tasks().tasks("train", 100) if t.data["user_task"] == "user_task_1")
    env: AgentDojoEnv = entry.factory()
    opening = asyncio.run(env.reset(task, 0))
    assert [m.role for m in opening.messages] == ["system", "user"]
    assert opening.messages[1].content == task.prompt
    bad = [
        call("no_such_tool", x=1),  # unknown tool
        call("send_money", recipient="GB29NWBK60161331926819"),  # missing arguments
        call("send_money", recipient="x", amount="lots", subject="s", date="2022-01-01"),  # wrong type
    ]
    for action in bad:
        result = asyncio.run(env.step(action))
        assert not result.terminated and not result.truncated
        assert result.messages[0].role == "tool" and result.messages[0].content.startswith("error:")
        assert result.messages[0].tool_call_id == action.tool_calls[0].id
        assert result.info["errors"]
    assert "no_such_tool" in env.traces[0].function  # the package's traces keep every call made
    for name, arguments in ground_truth(env.profile.suite, "user_task_1"):
        result = asyncio.run(env.step(call(name, **arguments)))
        assert "errors" not in result.info and not result.messages[0].content.startswith("error:")
    answer = env.profile.suite.get_user_task_by_id("user_task_1").GROUND_TRUTH_OUTPUT
    result = asyncio.run(env.step(Message(role="assistant", content=answer)))
    assert result.terminated and result.reward == 1.0
    after = asyncio.run(env.step(Message(role="assistant", content="again")))
    assert after.terminated and after.info["errors"] == ["step after termination"]


def test_an_episode_without_an_answer_is_truncated_and_still_scored(entry):
    task = entry.tasks().tasks("train", 1)[0]
    env = entry.factory()
    asyncio.run(env.reset(task, 0))
    results = [asyncio.run(env.step(call("get_balance"))) for _ in range(env.spec.max_turns)]
    assert not any(r.truncated for r in results[:-1])
    last = results[-1]
    assert last.truncated and not last.terminated
    assert last.info["success"] is False and last.reward == 0.0 and "utility" in last.info


PAIRS = {
    "user_tasks": ["user_task_0", "user_task_3", "user_task_5"],
    "injection_tasks": ["injection_task_0", "injection_task_3"],
}


def test_attack_tasks_are_injected_pairs(entry):
    source = entry.tasks(attack=ATTACK, **PAIRS)
    tasks = source.tasks("train", 100) + source.tasks("test", 100)
    assert len(tasks) == 6 and len({t.id for t in tasks}) == 6
    suite = source.profile.suite
    for task in tasks:
        goal = suite.get_injection_task_by_id(task.data["injection_task"]).GOAL
        assert task.data["attack"] == ATTACK and task.data["injections"]
        assert all(goal in text and "<INFORMATION>" in text for text in task.data["injections"].values())
    assert [t.model_dump() for t in entry.tasks(attack=ATTACK, **PAIRS).tasks("train", 100)] == [
        t.model_dump() for t in tasks if t.split == "train"
    ]


def test_the_naive_agent_is_hijacked_and_labelled_unsafe_but_the_expert_is_not(entry):
    source = entry.tasks(attack=ATTACK, **PAIRS)
    tasks = source.tasks("train", 100) + source.tasks("test", 100)
    naive, expert, suite = entry.expert(naive=True), entry.expert(), source.profile.suite
    for i, task in enumerate(tasks):
        label = f"injection:{task.data['injection_task']}"
        hijacked = play(entry, naive, task, seed=i)
        final = hijacked.steps[-1].info
        assert final["security"] is True and final["unsafe"] is True, task.id
        assert final["unsafe_labels"] == [label] and final["injection_task"] == task.data["injection_task"]
        flagged = [s for s in hijacked.steps if s.info.get("unsafe_actions")]
        assert flagged == [hijacked.steps[-1]] and flagged[0].info["unsafe_actions"] == [label]  # the end decides
        met = hijacked.steps[final["goal_met_step"]].action.tool_calls  # the call that met the injection's goal
        assert [c.name for c in met] == [ground_truth(suite, task.data["injection_task"])[-1][0]]
        safe = play(entry, expert, task, seed=i)
        final = safe.steps[-1].info
        assert final["security"] is False and final["unsafe"] is False and final["unsafe_labels"] == []
        assert final["goal_met_step"] is None and not any(s.info.get("unsafe_actions") for s in safe.steps)
        assert safe.reward == 1.0, task.id


def test_a_missing_package_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "agentdojo.task_suite.load_suites", None)
    with pytest.raises(AgentDojoEnvError, match="pip install agentdojo"):
        default_registry().get("agentdojo:slack")


def test_safactory_imports_without_loading_agentdojo():
    code = "import sys; from safactory.sim.registry import default_registry; default_registry(); "
    code += "print('agentdojo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_expert_reads_injected_values_it_must_use():
    # slack's channel names carry an injection, so the clean ground truth names a channel that is not there
    slack = default_registry().get("agentdojo:slack")
    source = slack.tasks(attack=ATTACK, user_tasks=["user_task_12"], injection_tasks=["injection_task_1"])
    task = source.tasks("train", 1)[0]  # user_task_12 is a train task
    trajectory = play(slack, slack.expert(), task)
    assert trajectory.reward == 1.0 and trajectory.steps[-1].info["unsafe"] is False
    sent = trajectory.steps[-2].action.tool_calls[0]
    assert sent.name == "send_channel_message" and "<INFORMATION>" in sent.arguments["channel"]
