"""The random policy: plausible tool calls with guessed arguments, some malformed on purpose.

It exercises environments' error paths (`safactory rollout --policy random`).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from safactory.policy.base import Completion, SamplingParams
from safactory.types import Message, ToolCall, ToolSpec

_TOKEN = re.compile(r"[A-Za-z0-9_.@/+*-]+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORDS = ("yes", "no", "done", "up", "left", "hello", "ok", "help", "stop", "42")


class RandomPolicy:
    """Random plausible actions, some of them malformed on purpose.

    Each turn it picks one of the offered tools and fills its arguments from the JSON
    Schema: an enum value, or a value guessed from the conversation (numbers, words,
    paths, addresses, an expression made of the numbers) or drawn at random for the
    schema's type. With probability `error_rate` the action is broken in one of these
    ways, so that environments' error handling gets exercised: free text instead of a
    tool call, an unknown tool, a missing required argument, an argument of the wrong
    type, an unexpected extra argument. Text is written in the plain-text tool
    protocol (`name(arg)`), the same as a small model's.
    """

    version = 0

    def __init__(self, seed: int = 0, error_rate: float = 0.3) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], not {error_rate}")
        self.rng = random.Random(seed)
        self.error_rate = error_rate

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        rng = self.rng
        guesses = self._guesses(messages)
        if not tools or rng.random() < self.error_rate / 4:
            return self._text(rng.choice(guesses + list(_WORDS)), tools)
        tool = rng.choice(tools)
        name = tool.name
        arguments = {p: self._value(schema, guesses) for p, schema in _properties(tool).items()}
        if rng.random() < self.error_rate:
            name, arguments = self._break(tool, arguments, guesses)
        call = ToolCall(id=f"call_{len(messages)}", name=name, arguments=arguments)
        text = _call_text(call)
        return Completion(text=text, tool_calls=[call], policy_version=self.version)

    def _text(self, text: str, tools: list[ToolSpec]) -> Completion:
        from safactory.policy.chat import parse_tool_calls  # transformers comes with it: only when needed

        calls, error = parse_tool_calls(text, tools)
        return Completion(text=text, tool_calls=calls, parse_error=error, policy_version=self.version)

    def _break(self, tool: ToolSpec, arguments: dict[str, Any], guesses: list[str]) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        required = [p for p in tool.parameters.get("required", []) if p in arguments]
        ways = ["unknown_tool", "wrong_type", "extra_argument"] + (["missing_argument"] if required else [])
        way = rng.choice(ways)
        if way == "unknown_tool":
            return rng.choice([tool.name + "_x", "run", "search", rng.choice(guesses)]), arguments
        broken = dict(arguments)
        if way == "missing_argument":
            del broken[rng.choice(required)]
        elif way == "wrong_type" and broken:
            broken[rng.choice(list(broken))] = rng.choice([None, 12345, [1, 2], {"x": 1}, True, ""])
        else:
            broken[rng.choice(["bogus", "extra", "verbose"])] = rng.choice([1, "x", None])
        return tool.name, broken

    def _value(self, schema: dict[str, Any], guesses: list[str]) -> Any:
        rng = self.rng
        if "enum" in schema and schema["enum"]:
            return rng.choice(list(schema["enum"]))
        # The parameter's description often lists valid values ("... name: left, down, right, up").
        description = str(schema.get("description", ""))
        hinted = [t.strip(".,;:") for t in _TOKEN.findall(description.rpartition(":")[2])]
        hinted = [t for t in hinted if t and t.lower() not in {"a", "an", "or", "and", "the", "e.g"}]
        if hinted and rng.random() < 0.6:
            guesses = hinted
        kind = schema.get("type", "string")
        if isinstance(kind, list):
            kind = rng.choice(kind) if kind else "string"
        if kind == "integer":
            numbers = [int(float(g)) for g in guesses if _NUMBER.fullmatch(g)]
            return rng.choice(numbers) if numbers and rng.random() < 0.7 else rng.randint(-1, 10)
        if kind == "number":
            numbers = [float(g) for g in guesses if _NUMBER.fullmatch(g)]
            return rng.choice(numbers) if numbers and rng.random() < 0.7 else round(rng.uniform(-10, 100), 2)
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "array":
            items = schema.get("items", {"type": "string"})
            return [self._value(items, guesses) for _ in range(rng.randint(0, 2))]
        if kind == "object":
            return {p: self._value(s, guesses) for p, s in schema.get("properties", {}).items()}
        if kind == "null":
            return None
        return self._string(guesses)

    def _string(self, guesses: list[str]) -> str:
        rng = self.rng
        numbers = [g for g in guesses if _NUMBER.fullmatch(g)]
        roll = rng.random()
        if roll < 0.15 and len(numbers) >= 2:
            a, b = rng.sample(numbers, 2)
            return f"{a}{rng.choice('+-*')}{b}"
        if roll < 0.4 and guesses:  # the freshest tokens (a tool's last answer) are the likeliest to fit
            return rng.choice(guesses[:3])
        if roll < 0.85 and guesses:
            return rng.choice(guesses)
        return rng.choice(["", "x", "/tmp", "hello world", str(rng.randint(0, 999))])

    @staticmethod
    def _guesses(messages: list[Message]) -> list[str]:
        """Tokens of the latest messages (the task and the freshest observations), newest first."""
        found: list[str] = []
        for message in reversed(messages[-6:]):
            for token in _TOKEN.findall(message.content):
                token = token.strip(".,;:")
                if token and token not in found:
                    found.append(token)
                if len(found) >= 64:
                    return found
        return found


def _call_text(call: ToolCall) -> str:
    """A call in the plain-text tool protocol: `name(arg)`, or `name({json})` for other than one argument."""
    args = call.arguments
    inner = str(next(iter(args.values()))) if len(args) == 1 else json.dumps(args)
    return f"{call.name}({inner})"


def _properties(tool: ToolSpec) -> dict[str, dict[str, Any]]:
    props = tool.parameters.get("properties", {})
    return {p: (s if isinstance(s, dict) else {}) for p, s in props.items()} if isinstance(props, dict) else {}
