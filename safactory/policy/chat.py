"""Chat rendering and tool-call parsing for the plain-text tool protocol.

Small models (such as the character-level tiny model) do not get tool schemas in
their prompt; they call tools by writing one line `name(argument)`, e.g.
`calc(12+7)` or `answer(19)`. A JSON object inside the parentheses gives named
arguments: `send({"to": "bob", "text": "hi"})`. A single plain argument goes to the
tool's first (required) parameter.

Rendering, as tokens (each assistant turn ends with the <eos> token it sampled):

    <bos>U: What is 3 + 4?\nA: calc(3+4)<eos>O: 7\nA: answer(7)<eos>

Rendering is incremental: the prompt of turn k+1 starts with the prompt and the
completion of turn k token for token, so a whole episode trains as one sequence.
"""

from __future__ import annotations

import json
import re

from safactory.policy.tokenizer import CharTokenizer
from safactory.types import Message, ToolCall, ToolSpec

PREFIX = {"system": "S: ", "user": "U: ", "assistant": "A: ", "tool": "O: "}
_CALL = re.compile(r"([A-Za-z_]\w*)\((.*)\)", re.DOTALL)


def assistant_text(message: Message) -> str:
    """The text of an assistant turn in the plain-text protocol."""
    if message.content or not message.tool_calls:
        return message.content
    lines = []
    for call in message.tool_calls:
        args = call.arguments
        inner = str(next(iter(args.values()))) if len(args) == 1 else json.dumps(args)
        lines.append(f"{call.name}({inner})")
    return "\n".join(lines)


def parse_tool_calls(text: str, tools: list[ToolSpec]) -> tuple[list[ToolCall], str | None]:
    """Parse plain-text tool calls, one per non-empty line. Returns (calls, error)."""
    calls: list[ToolCall] = []
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return [], "empty completion"
    by_name = {t.name: t for t in tools}
    for line in lines:
        match = _CALL.fullmatch(line)
        if match is None:
            return [], f"not a tool call: {line[:60]!r}"
        name, inner = match.group(1), match.group(2).strip()
        arguments: dict[str, object] | None = None
        if inner.startswith("{"):
            try:
                loaded = json.loads(inner)
            except json.JSONDecodeError:
                loaded = None
            if isinstance(loaded, dict):
                arguments = loaded
        if arguments is None:
            spec = by_name.get(name)
            params = spec.param_names() if spec is not None else []
            arguments = {params[0] if params else "arg": inner}
        calls.append(ToolCall(id=f"call_{len(calls)}", name=name, arguments=arguments))
    return calls, None


class PlainTextChat:
    """Renders conversations to token ids for a model that uses the plain-text protocol."""

    def __init__(self, tokenizer: CharTokenizer) -> None:
        self.tokenizer = tokenizer

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a mask that is 1 on assistant-written tokens."""
        tok = self.tokenizer
        ids = [tok.bos_id]
        mask = [0]
        for message in messages:
            prefix = tok.encode(PREFIX[message.role])
            ids += prefix
            mask += [0] * len(prefix)
            if message.role == "assistant":
                body = tok.encode(assistant_text(message)) + [tok.eos_id]
                ids += body
                mask += [1] * len(body)
            else:
                body = tok.encode(message.content.replace("\n", " ") + "\n")
                ids += body
                mask += [0] * len(body)
        if add_generation_prompt:
            prefix = tok.encode(PREFIX["assistant"])
            ids += prefix
            mask += [0] * len(prefix)
        return ids, mask

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        return self.render(messages, add_generation_prompt=True)[0]

    def parse(self, text: str, tools: list[ToolSpec]) -> tuple[list[ToolCall], str | None]:
        return parse_tool_calls(text, tools)
