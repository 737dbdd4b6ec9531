"""The `mcp:` adapter against our own toy server and a third-party server from PyPI (mcp-server-time)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")

from safactory.policy.base import Completion, SamplingParams  # noqa: E402
from safactory.policy.chat import parse_tool_calls  # noqa: E402
from safactory.sim.agent import EpisodeLimits, run_episode  # noqa: E402
from safactory.sim.env import EnvRegistry  # noqa: E402
from safactory.sim.envs import mcp as mcp_adapter  # noqa: E402
from safactory.sim.envs.mcp import (  # noqa: E402
    McpEnv,
    McpServerError,
    McpTasks,
    answer_matches,
    result_text,
    tool_spec,
)
from safactory.types import Message, StepResult, Task, ToolCall, ToolSpec  # noqa: E402

TOY = Path(__file__).with_name("mcp_toy_server.py")
TOY_CMD = f"{shlex.quote(sys.executable)} {shlex.quote(str(TOY))}"
TIME_CMD = f"{shlex.quote(sys.executable)} -m mcp_server_time --local-timezone UTC"
needs_time_server = pytest.mark.skipif(
    importlib.util.find_spec("mcp_server_time") is None, reason="mcp-server-time is not installed"
)


def registry() -> EnvRegistry:
    reg = EnvRegistry()
    mcp_adapter.register(reg)
    return reg


def task(answer: Any = None, prompt: str = "Use the tools.") -> Task:
    data = {} if answer is None else {"answer": answer}
    return Task(id="t1", env_id="mcp", split="test", prompt=prompt, data=data)


def call(name: str, call_id: str = "c0", **arguments: Any) -> Message:
    return Message(role="assistant", tool_calls=[ToolCall(id=call_id, name=name, arguments=arguments)])


class Scripted:
    """A policy that plays fixed turns; each turn is a list of (tool, arguments) or plain text."""

    def __init__(self, turns: list[list[tuple[str, dict[str, Any]]] | str]) -> None:
        self.turns = list(turns)
        self.seen_tools: list[ToolSpec] = []

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        self.seen_tools = list(tools)
        turn = self.turns.pop(0) if self.turns else "nothing left to say"
        if isinstance(turn, str):
            return Completion(text=turn)
        calls = [ToolCall(id=f"c{len(messages)}_{i}", name=n, arguments=a) for i, (n, a) in enumerate(turn)]
        return Completion(text="", tool_calls=calls)


class PlainText:
    """A policy that writes the plain-text tool protocol (`name(args)`), parsed like a small model's output."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = list(lines)

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        text = self.lines.pop(0)
        calls, error = parse_tool_calls(text, tools)
        return Completion(text=text, tool_calls=calls, parse_error=error)


def episode(command: str, policy: Any, the_task: Task, max_turns: int = 8) -> Any:
    entry = registry().get(f"mcp:{command}")
    return asyncio.run(
        run_episode(
            entry.factory,
            policy,
            the_task,
            seed=0,
            sampling=SamplingParams(),
            limits=EpisodeLimits(max_turns=max_turns, timeout_s=120),
        )
    )


def test_tools_map_schemas_and_hints():
    async def go() -> Any:
        env = McpEnv(TOY_CMD)
        try:
            return await env.reset(task(), 0)
        finally:
            await env.close()

    obs = asyncio.run(go())
    tools = {t.name: t for t in obs.tools}
    names = {"add", "write_note", "read_notes", "delete_notes", "explode", "pid", "crash", "nap", "spawn_helper"}
    assert set(tools) == names | {"answer"}
    add = tools["add"]
    assert add.parameters["properties"]["a"]["type"] == "integer" and add.parameters["required"] == ["a", "b"]
    assert add.description == "Add two integers."
    assert (add.read_only, add.destructive) == (True, False)
    assert (tools["write_note"].read_only, tools["write_note"].destructive) == (False, False)
    assert (tools["delete_notes"].read_only, tools["delete_notes"].destructive) == (False, True)
    assert tools["explode"].destructive  # no annotations: MCP's default destructiveHint is true
    assert tools["answer"].param_names() == ["value"]
    assert obs.messages[0].role == "system" and "notebook" in obs.messages[0].content  # server instructions
    assert obs.messages[-1] == Message(role="user", content="Use the tools.")
    assert obs.info["server"]["name"] == "toy-notes"


def test_tool_spec_mapping_rules():
    bare = tool_spec({"name": "x"})
    assert bare.parameters == {"type": "object", "properties": {}} and bare.destructive and not bare.read_only
    ro = tool_spec({"name": "y", "annotations": {"readOnlyHint": True, "destructiveHint": True}})
    assert ro.read_only and not ro.destructive  # destructiveHint only means something when not read-only
    titled = tool_spec({"name": "z", "title": "Zed", "annotations": {"destructiveHint": False}})
    assert titled.description == "Zed" and not titled.destructive


def test_result_text_mapping():
    text, err = result_text(
        {
            "content": [
                {"type": "text", "text": "hello"},
                {"type": "image", "data": "AAAA", "mimeType": "image/png"},
                {"type": "resource", "resource": {"uri": "file:///a", "text": "inside"}},
                {"type": "resource_link", "uri": "file:///b", "name": "b"},
            ],
            "isError": False,
        },
        1000,
    )
    assert text == "hello\n[image image/png]\ninside\n[resource link file:///b]" and not err
    assert result_text({"content": [], "structuredContent": {"b": 1, "a": 2}}, 1000) == ('{"a": 2, "b": 1}', False)
    assert result_text({"content": [], "isError": True}, 1000) == ("(no output)", True)
    long, _ = result_text({"content": [{"type": "text", "text": "x" * 50}]}, 10)
    assert long.startswith("x" * 10) and "40 more characters cut" in long


def test_answer_matching():
    assert answer_matches(" 42 ", "42") and answer_matches("42.0", 42) and answer_matches("1,000", "1000")
    assert answer_matches("Paris.", "paris") and answer_matches("new  york", "New York")
    assert answer_matches("b", ["a", "b"]) and not answer_matches("c", ["a", "b"])
    assert not answer_matches("41", "42") and not answer_matches("4 2", "42")
    assert not answer_matches("", "0")


def test_episode_end_to_end_with_answer():
    policy = Scripted(
        [
            [("write_note", {"text": "remember 5"})],
            [("read_notes", {}), ("add", {"a": 2, "b": 3})],
            [("answer", {"value": "5"})],
        ]
    )
    traj = episode(TOY_CMD, policy, task(answer="5"))
    assert traj.termination == "terminated" and traj.success and traj.reward == 1.0
    assert [m.content for m in traj.steps[1].observation] == ["remember 5", "5"]
    assert all(m.role == "tool" and m.tool_call_id for s in traj.steps for m in s.observation)
    assert traj.steps[-1].info == {"answer": "5", "success": True}
    assert "answer" in {t.name for t in traj.tools} and "add" in {t.name for t in policy.seen_tools}

    wrong = episode(TOY_CMD, PlainText(['add({"a": 2, "b": 2})', "answer(5)"]), task(answer="4"))
    assert wrong.steps[0].observation[0].content == "4"
    assert wrong.termination == "terminated" and not wrong.success and wrong.reward == 0.0
    assert wrong.steps[-1].info["answer"] == "5"


def test_answer_without_expected_value_is_recorded_for_a_judge():
    traj = episode(TOY_CMD, Scripted([[("answer", {"value": "blue"})]]), task())
    assert traj.termination == "terminated" and not traj.success
    assert traj.steps[0].reward is None and traj.steps[0].info == {"answer": "blue"}


def test_errors_become_tool_messages_never_exceptions():
    async def go() -> tuple[list[StepResult], StepResult]:
        env = McpEnv(TOY_CMD, max_turns=9, call_timeout_s=1.0)
        await env.reset(task(answer="1"), 0)
        try:
            results = [
                await env.step(call("add", a="x", b=3)),  # the server rejects the argument
                await env.step(call("explode", message="boom")),  # the tool raises
                await env.step(call("nope")),  # unknown tool
                await env.step(call("add", a=1)),  # missing argument
                await env.step(Message(role="assistant", content="I will think about it")),  # no tool call
                await env.step(call("nap", seconds=30)),  # times out
                await env.step(call("add", a=1, b=1)),  # the session still works afterwards
                await env.step(call("answer")),  # answer without a value
            ]
            last = await env.step(call("read_notes"))  # the 9th turn reaches max_turns
            return results, last
        finally:
            await env.close()

    results, last = asyncio.run(go())
    bad_arg, raised, unknown, missing, no_call, slow, ok, empty_answer = results
    for r in (bad_arg, raised, unknown, missing, slow, empty_answer):
        assert r.messages[0].role == "tool" and r.messages[0].content.startswith("error")
        assert r.info["errors"] and not r.terminated and not r.truncated
    assert "addArguments" in bad_arg.messages[0].content or "integer" in bad_arg.messages[0].content
    assert "explode" in raised.messages[0].content
    assert "unknown tool 'nope'" in unknown.messages[0].content and "add" in unknown.messages[0].content
    assert "needs argument(s) b" in missing.messages[0].content
    assert no_call.messages[0].role == "user" and no_call.messages[0].content.startswith("error: no tool call")
    assert "timed out" in slow.messages[0].content
    assert ok.messages[0].content == "2" and "errors" not in ok.info
    assert last.truncated and not last.terminated


def test_several_calls_in_one_turn_and_calls_after_the_answer():
    async def go() -> StepResult:
        env = McpEnv(TOY_CMD)
        await env.reset(task(answer=7), 0)
        try:
            action = Message(
                role="assistant",
                tool_calls=[
                    ToolCall(id="a", name="add", arguments={"a": 3, "b": 4}),
                    ToolCall(id="b", name="answer", arguments={"value": "7"}),
                    ToolCall(id="c", name="delete_notes", arguments={}),
                ],
            )
            result = await env.step(action)
            after = await env.step(call("read_notes"))
            assert after.terminated and after.messages[0].content.startswith("error: episode is over")
            return result
        finally:
            await env.close()

    result = asyncio.run(go())
    assert [m.tool_call_id for m in result.messages] == ["a", "b", "c"]
    assert [m.content for m in result.messages[:2]] == ["7", "correct"]
    assert result.messages[2].content == "error: not run; the episode ended"
    assert result.terminated and result.reward == 1.0 and result.info["success"] is True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_one_server_per_episode_and_close_ends_it():
    async def go() -> tuple[list[int], list[str]]:
        env = McpEnv(TOY_CMD)
        pids: list[int] = []
        notes: list[str] = []
        for i in range(2):
            await env.reset(task(), i)  # the second reset replaces the first server
            pids.append(int((await env.step(call("pid"))).messages[0].content))
            notes.append((await env.step(call("read_notes"))).messages[0].content)
            await env.step(call("write_note", text=f"episode {i}"))
            if i == 0:
                assert _alive(pids[0])
        await env.close()
        await env.close()  # idempotent
        return pids, notes

    pids, notes = asyncio.run(go())
    assert pids[0] != pids[1]
    assert notes == ["(no notes)", "(no notes)"]  # no state leaks from one episode to the next
    assert not _alive(pids[0]) and not _alive(pids[1])


def test_concurrent_episodes_each_get_their_own_server():
    entry = registry().get(f"mcp:{TOY_CMD}")

    async def go() -> list[Any]:
        episodes = [
            run_episode(
                entry.factory,
                Scripted([[("write_note", {"text": f"mine {i}"})], [("read_notes", {})], [("answer", {"value": "x"})]]),
                task(answer="x"),
                seed=i,
                sampling=SamplingParams(),
                limits=EpisodeLimits(max_turns=5, timeout_s=120),
            )
            for i in range(3)
        ]
        return list(await asyncio.gather(*episodes))

    trajs = asyncio.run(go())
    assert [t.steps[1].observation[0].content for t in trajs] == ["mine 0", "mine 1", "mine 2"]
    assert all(t.success for t in trajs)


def test_server_that_fails_to_start_gives_a_clear_error():
    async def reset_error(env: McpEnv) -> str:
        with pytest.raises(McpServerError) as info:
            await env.reset(task(), 0)
        await env.close()  # closing after a failed start is fine
        with pytest.raises(RuntimeError):
            await env.step(call("add", a=1, b=2))
        return str(info.value)

    missing = asyncio.run(reset_error(McpEnv("/nonexistent/mcp-server --flag")))
    assert "failed to start" in missing and "/nonexistent/mcp-server" in missing
    refused = asyncio.run(reset_error(McpEnv(f"{TOY_CMD} --fail")))
    assert "failed to start" in refused and "refusing to start (--fail)" in refused  # the server's stderr
    silent_cmd = f"{shlex.quote(sys.executable)} -c 'import sys; sys.stdin.read()'"
    silent = asyncio.run(reset_error(McpEnv(silent_cmd, startup_timeout_s=1.0)))
    assert "did not initialise within 1s" in silent

    traj = episode(f"{TOY_CMD} --fail", Scripted([]), task())
    recorded = getattr(traj, "error", None) or traj.tags.get("error", "")  # where the agent loop records it
    assert traj.termination == "env_error" and "failed to start" in recorded and not traj.steps


def test_server_crash_mid_episode_truncates_it():
    traj = episode(
        TOY_CMD, Scripted([[("add", {"a": 1, "b": 2})], [("crash", {})], [("add", {"a": 1, "b": 1})]]), task()
    )
    assert traj.termination == "truncated" and len(traj.steps) == 2
    crash = traj.steps[1]
    assert crash.observation[0].content.startswith("error") and crash.info["server_lost"] is True
    assert "close_error" not in traj.tags


def test_pseudo_tool_renamed_when_the_server_has_an_answer_tool():
    policy = Scripted([[("answer", {"question": "life?"})], [("submit_answer", {"value": "42"})]])
    traj = episode(f"{TOY_CMD} --own-answer", policy, task(answer=42))
    assert traj.steps[0].observation[0].content == "42"  # the server's own tool
    assert traj.termination == "terminated" and traj.success
    assert {"answer", "submit_answer"} <= {t.name for t in traj.tools}


@needs_time_server
def test_third_party_server_mcp_server_time():
    policy = Scripted(
        [
            [("convert_time", {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"})],
            [("convert_time", {"source_timezone": "Nowhere/Land", "time": "12:00", "target_timezone": "UTC"})],
            [("get_current_time", {"timezone": "UTC"})],
            [("answer", {"value": "21:00"})],
        ]
    )
    traj = episode(TIME_CMD, policy, task(answer="21:00", prompt="What time is it in Tokyo at 12:00 UTC?"))
    tools = {t.name: t for t in traj.tools}
    assert {"get_current_time", "convert_time", "answer"} <= set(tools)
    assert tools["convert_time"].read_only and not tools["convert_time"].destructive
    assert tools["convert_time"].parameters["required"] == ["source_timezone", "time", "target_timezone"]
    converted = json.loads(traj.steps[0].observation[0].content)
    assert converted["target"]["datetime"].endswith("T21:00:00+09:00")
    bad = traj.steps[1]
    assert bad.observation[0].content.startswith("error") and bad.info["errors"]
    assert json.loads(traj.steps[2].observation[0].content)["timezone"] == "UTC"
    assert traj.termination == "terminated" and traj.success and traj.reward == 1.0


# ---- tasks ---------------------------------------------------------------------------------


def write_rows(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n\n")
    return path


def test_tasks_from_jsonl(tmp_path, monkeypatch):
    rows = [{"id": "a", "prompt": "p a", "split": "train", "answer": "1", "data": {"hint": "h"}}]
    rows += [{"id": i, "prompt": f"p {i}"} for i in range(40)]
    rows += [{"id": "z", "prompt": "p z", "split": "test"}]
    path = write_rows(tmp_path / "tasks.jsonl", rows)
    entry = registry().get(f"mcp:{TOY_CMD}")
    source = entry.tasks(tasks_path=str(path))
    train, test = source.tasks("train", 1000), source.tasks("test", 1000)
    assert len(train) + len(test) == 42 and test and {t.id for t in train}.isdisjoint(t.id for t in test)
    first = train[0]
    assert first.id == "a" and first.data == {"hint": "h", "answer": "1"} and first.env_id == f"mcp:{TOY_CMD}"
    assert "z" in {t.id for t in test}
    assert [t.id for t in source.tasks("train", 3)] == [t.id for t in train[:3]]
    assert [t.split for t in McpTasks(tasks_path=path).tasks("test", 1000)] == ["test"] * len(test)  # deterministic
    monkeypatch.setenv(mcp_adapter.TASKS_ENV_VAR, str(path))
    assert [t.id for t in entry.tasks().tasks("test", 1000)] == [t.id for t in test]
    with pytest.raises(ValueError, match="no 'validation' tasks"):
        source.tasks("validation", 1)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"prompt": "p"}', "'id'"),
        ('{"id": "x"}', "'prompt'"),
        ('{"id": "x", "prompt": "p", "data": 3}', "'data'"),
        ('{"id": "x", "prompt": "p", "answr": 3}', "unknown key"),
        ('{"id": "a", "prompt": "again"}', "duplicate task id"),
    ],
)
def test_broken_task_rows_name_their_line(tmp_path, line, message):
    path = write_rows(tmp_path / "bad.jsonl", [{"id": "a", "prompt": "ok"}, line])
    with pytest.raises(ValueError, match=message) as info:
        McpTasks(tasks_path=path)
    assert "bad.jsonl:2" in str(info.value)


def test_tasks_need_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv(mcp_adapter.TASKS_ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="SAFACTORY_MCP_TASKS"):
        McpTasks()
    with pytest.raises(ValueError, match="does not exist"):
        McpTasks(tasks_path=tmp_path / "missing.jsonl")


def test_registry_resolves_commands():
    reg = registry()
    entry = reg.get("mcp:uvx 'my server' --flag")
    assert entry.spec.id == "mcp:uvx 'my server' --flag" and entry.expert is None
    assert entry.factory().argv == ["uvx", "my server", "--flag"]  # constructing starts nothing
    with pytest.raises(ValueError, match="empty MCP server command"):
        reg.get("mcp:   ")
    with pytest.raises(ValueError, match="cannot parse"):
        reg.get("mcp:python 'unterminated")


def test_the_calls_of_one_step_share_its_time_budget():
    async def go() -> StepResult:
        env = McpEnv(TOY_CMD, call_timeout_s=1.0)
        await env.reset(task(), 0)
        try:
            naps = [ToolCall(id=f"n{i}", name="nap", arguments={"seconds": 30}) for i in range(3)]
            return await env.step(Message(role="assistant", tool_calls=naps))
        finally:
            await env.close()

    first, *rest = asyncio.run(go()).messages
    assert "timed out" in first.content  # the rest are not even started: the step stays within its budget
    assert all(m.content.startswith("error: not run; this step's calls used up") for m in rest)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups, read in /proc")
def test_helpers_a_server_leaves_behind_are_killed_when_the_episode_closes():
    async def go() -> int:
        env = McpEnv(TOY_CMD)
        await env.reset(task(), 0)
        try:
            return int((await env.step(call("spawn_helper"))).messages[0].content)
        finally:
            await env.close()

    helper = asyncio.run(go())
    for _ in range(400):  # bounded wait for the kill to land; no timing assumption
        if not _alive(helper):
            break
        time.sleep(0.05)
    assert not _alive(helper)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False
