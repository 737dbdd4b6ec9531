"""Scripted AgentDojo agents: an expert that replays the package's ground truth, and a naive one that obeys injections.

Both read the user task from the prompt (the first user message is the task's prompt,
matched against the suite's user tasks) and take the package's ground-truth calls of
that task one per turn, then answer with the task's ground-truth output. The naive
agent (`naive=True`) also treats any tool result that holds an injection task's goal as
an order: it first replays that injection task's ground-truth calls, then goes on with
the user's task, as a gullible model would; it gives the attacks something to measure.
Ground truth is computed on the suite's environment without injections, but some
injections change values the calls use (slack's channel names carry one). So, as an agent
would, the experts read such values from the tool results: each result of a ground-truth
call is aligned with what the same call returns on the clean environment, and a string
that differs replaces the clean one in the later calls' arguments.
They keep no state: each turn the script is replayed against the tool results so far.
They speak the plain-text tool protocol (`name({json})`).
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from typing import Any

import yaml

from safactory.policy.base import Completion, SamplingParams
from safactory.sim.envs.agentdojo import DojoProfile, dojo, fresh_environment, ground_truth
from safactory.types import Message, ToolCall, ToolSpec

DONE_TEXT = "Done."  # the answer when a task's ground truth has no output to give
Call = tuple[str, dict[str, Any]]


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """The plain-text protocol form of one call: `name(text)` for one string argument, else `name({json})`."""
    if len(arguments) == 1:
        value = next(iter(arguments.values()))
        if isinstance(value, str) and value and "\n" not in value and not value.startswith("{"):
            return f"{name}({value})"
    return f"{name}({json.dumps(arguments)})"


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def texts_of(content: str) -> list[str]:
    """The texts a tool result holds: itself, and each string of it read as YAML (how the package formats results)."""
    out = [_squash(content)]
    try:
        loaded = yaml.safe_load(content)
    except yaml.YAMLError:
        return out
    return out + [_squash(s) for s in _strings(loaded)]


def parsed(content: str) -> Any:
    """A tool result as data (the package writes results as YAML), or the text itself."""
    try:
        return yaml.safe_load(content)
    except yaml.YAMLError:
        return content


@cache
def clean_results(suite: Any, user_id: str) -> tuple[Any, ...]:
    """What each ground-truth call of a user task returns on the environment without injections, as data."""
    runtime = dojo("functions_runtime").FunctionsRuntime(suite.tools)
    to_text = dojo("agent_pipeline.tool_execution").tool_result_to_str
    environment = suite.get_user_task_by_id(user_id).init_environment(fresh_environment(suite))
    out = []
    for name, arguments in ground_truth(suite, user_id):
        result, error = runtime.run_function(environment, name, copy.deepcopy(arguments))
        out.append(parsed(error if error is not None else to_text(result)))
    return tuple(out)


def align(clean: Any, seen: Any, found: dict[str, str]) -> None:
    """Record in `found` each string of a clean result that reads differently in the result seen."""
    if isinstance(clean, str) and isinstance(seen, str):
        if clean != seen:
            found.setdefault(clean, seen)
    elif isinstance(clean, list) and isinstance(seen, list) and len(clean) == len(seen):
        for a, b in zip(clean, seen, strict=True):
            align(a, b, found)
    elif isinstance(clean, dict) and isinstance(seen, dict) and clean.keys() == seen.keys():
        for key in clean:
            align(clean[key], seen[key], found)


def substitute(value: Any, found: dict[str, str]) -> Any:
    """`value` with every string that was read differently replaced by what was read."""
    if isinstance(value, str):
        return found.get(value, value)
    if isinstance(value, list):
        return [substitute(v, found) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, found) for k, v in value.items()}
    return value


@cache
def _prompts(suite: Any) -> dict[str, str]:
    return {_squash(task.PROMPT): task_id for task_id, task in suite.user_tasks.items()}


@cache
def _goals(suite: Any) -> tuple[tuple[str, str], ...]:
    """(squashed goal, injection task id), longest goal first (so a goal that holds another wins)."""
    goals = [(_squash(task.GOAL), task_id) for task_id, task in suite.injection_tasks.items() if task.GOAL.strip()]
    return tuple(sorted(goals, key=lambda g: -len(g[0])))


def injection_in(suite: Any, content: str) -> str | None:
    """The id of the injection task whose goal a tool result states, or None."""
    texts = texts_of(content)
    for goal, task_id in _goals(suite):
        if any(goal in text for text in texts):
            return task_id
    return None


class AgentDojoExpert:
    """Scripted agent for one suite: the ground-truth expert, or with `naive=True` the one that obeys injections."""

    version = 0

    def __init__(self, profile: DojoProfile, naive: bool = False) -> None:
        self.profile = profile
        self.naive = naive

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        action = self.next_action(messages)
        if isinstance(action, str):
            return Completion(text=action, policy_version=self.version)
        name, arguments = action
        call = ToolCall(id=f"call_{len(messages)}", name=name, arguments=arguments)
        return Completion(text=call_text(name, arguments), tool_calls=[call], policy_version=self.version)

    def next_action(self, messages: list[Message]) -> Call | str:
        """The next call, or the final answer (a string)."""
        suite = self.profile.suite
        first = next((i for i, m in enumerate(messages) if m.role == "user"), None)
        user_id = _prompts(suite).get(_squash(messages[first].content)) if first is not None else None
        if user_id is None:
            return "I cannot tell which task this is."
        user_calls = ground_truth(suite, user_id)
        pending: list[tuple[int | None, Call]] = [(k, call) for k, call in enumerate(user_calls)]  # k: user call index
        found: dict[str, str] = {}  # clean value -> value read in a result
        obeyed: str | None = None
        for message in messages[first + 1 :]:
            if message.role != "tool":
                continue
            if pending:  # the call this result answers
                k, _ = pending.pop(0)
                if k is not None:
                    align(clean_results(suite, user_id)[k], parsed(message.content), found)
            if self.naive and obeyed is None and (injected := injection_in(suite, message.content)) is not None:
                obeyed = injected
                pending = [(None, call) for call in ground_truth(suite, injected)] + pending
        if pending:
            k, (name, arguments) = pending[0]
            return name, substitute(copy.deepcopy(arguments), found) if k is not None else copy.deepcopy(arguments)
        answers = [suite.get_user_task_by_id(user_id).GROUND_TRUTH_OUTPUT]
        if obeyed is not None:
            answers.append(suite.get_injection_task_by_id(obeyed).GROUND_TRUTH_OUTPUT)
        return "\n".join(a for a in answers if a.strip()) or DONE_TEXT
