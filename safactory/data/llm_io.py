"""Talking to a model behind an OpenAI-compatible endpoint, for the LLM judge and the lesson
writer: the model name, one chat reply as text, closing and running from synchronous code,
an episode rendered as a plain-text transcript, and the JSON objects in a reply.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from typing import Any

from safactory.policy.base import SamplingParams
from safactory.types import Message, Trajectory


def client_model(client: Any, model: str | None) -> str:
    """The model name a client talks to: `model`, else the client's own (`EndpointPolicy.model`)."""
    if model:
        return model
    own = getattr(client, "model", None)
    return own if isinstance(own, str) and own else type(client).__name__


async def chat_text(
    client: Any, messages: list[Message], *, model: str | None = None, max_tokens: int = 256, temperature: float = 0.0
) -> str:
    """The assistant text for `messages` from a Policy (EndpointPolicy, LocalPolicy, ...) or an openai client.

    Raises whatever the client raises; callers turn that into a recorded failure.
    """
    if hasattr(client, "generate"):
        completion = await client.generate(messages, [], SamplingParams(temperature=temperature, max_tokens=max_tokens))
        return str(completion.text)
    chat = getattr(client, "chat", None)
    if chat is None:
        raise TypeError(f"{type(client).__name__} is neither a Policy nor an OpenAI client")
    if not model:
        raise ValueError("a plain OpenAI client needs the model name (model=...)")
    kwargs = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "temperature": temperature,
        "max_tokens": max_tokens,
    }
    # a sync client blocks: call it in a thread; an async one returns an awaitable from that call
    response = await asyncio.to_thread(chat.completions.create, **kwargs)
    if inspect.isawaitable(response):
        response = await response
    return str(response.choices[0].message.content or "")


async def close_client(client: Any) -> None:
    """Close an EndpointPolicy's per-loop connection pool (it reopens on the next call)."""
    close = getattr(client, "close", None)
    if close is not None and hasattr(client, "generate") and inspect.iscoroutinefunction(close):
        await close()


def run_sync(coro: Any) -> Any:
    """Run a coroutine from synchronous code; a clear error inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError("called from a running event loop; await the async variant instead")


# ---- transcripts and replies ------------------------------------------------------------------------
def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = max(limit // 2 - 20, 1)
    return f"{text[:half]} [... {len(text) - 2 * half} characters cut ...] {text[-half:]}"


def render_episode(traj: Trajectory, max_chars_per_message: int = 1200, max_chars: int = 12000) -> str:
    """A plain-text transcript of an episode for a judge (or a summariser) to read."""
    lines = [f"Environment: {traj.env_id}", f"Task: {_cut(traj.task.prompt, max_chars_per_message)}"]
    if traj.tools:
        hints = []
        for tool in traj.tools:
            tags = [t for t, on in (("destructive", tool.destructive), ("read-only", tool.read_only)) if on]
            hints.append(f"{tool.name}({', '.join(tool.param_names())})" + (f" [{', '.join(tags)}]" if tags else ""))
        lines.append("Tools: " + "; ".join(hints))
    lines.append("Opening messages:")
    lines += [f"  [{m.role}] {_cut(m.content, max_chars_per_message)}" for m in traj.prompt]
    for step in traj.steps:
        lines.append(f"Step {step.index}:")
        if step.action.content:
            lines.append(f"  agent wrote: {_cut(step.action.content, max_chars_per_message)}")
        for call in step.action.tool_calls:
            args = json.dumps(call.arguments, ensure_ascii=False, default=str)
            lines.append(f"  agent called: {call.name} {_cut(args, max_chars_per_message)}")
        for message in step.observation:
            who = message.name or message.role
            lines.append(f"  observed ({who}): {_cut(message.content, max_chars_per_message)}")
    lines.append(f"Outcome: termination={traj.termination or '?'}, success={traj.success}")
    return _cut("\n".join(lines), max_chars)


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def json_objects(text: str) -> list[dict[str, Any]]:
    """Every JSON object embedded in `text` (fenced blocks first), in order."""
    decoder = json.JSONDecoder()
    sources = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    found: list[dict[str, Any]] = []
    for source in sources:
        i = source.find("{")
        while i != -1:
            try:
                obj, end = decoder.raw_decode(source, i)
            except (ValueError, RecursionError):  # JSONDecodeError, or an integer too long to convert
                i = source.find("{", i + 1)
                continue
            if isinstance(obj, dict):
                found.append(obj)
            i = source.find("{", max(end, i + 1))
    return found
