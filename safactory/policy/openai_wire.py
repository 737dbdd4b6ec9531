"""The OpenAI wire format of the policy server: request bodies, error shapes and record conversion.

What crosses the HTTP boundary and nothing else: the pydantic request models (unknown OpenAI / vLLM
fields are ignored), `APIError` and the `{"error": {...}}` body it is answered with, OpenAI chat
messages and function tools turned into our `Message` / `ToolSpec` records (a 400 on what we cannot
take), and the log-prob shapes of OpenAI's and vLLM's answers. The endpoints themselves live in
`safactory.policy.openai_service`, the app in `safactory.policy.server`.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from safactory.policy.subword import TinyTokenizer
from safactory.request_limits import shorten
from safactory.types import Message, ToolCall, ToolSpec

MAX_N = 64
MAX_ERROR_MESSAGE = 2000  # characters of an error message sent
MIN_TEMPERATURE = 1e-5  # a lower positive temperature samples at this one
MIN_TOP_P = 1e-30  # a lower top_p keeps the top token only, like this one
MAX_PATH_CHARS = 4096  # a load_weights path longer than this is refused unread (Linux's PATH_MAX)


# ---- errors ------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def error_kind(status: int) -> str:
    """The OpenAI error type of a status: a client's fault below 500, the server's from 500."""
    return "invalid_request_error" if status < 500 else "server_error"


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    """The JSON answer of an error, in OpenAI's shape (the message bounded, and escaped where it is not UTF-8)."""
    body = {"error": {"message": shorten(message, MAX_ERROR_MESSAGE), "type": kind, "param": None, "code": status}}
    return JSONResponse(status_code=status, content=body)


# ---- request bodies ----------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI / vLLM fields are ignored


class ChatRequest(_Body):
    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool | None = False
    return_token_ids: bool | None = False
    return_tokens_as_token_ids: bool | None = False


class CompletionRequest(_Body):
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    add_special_tokens: bool | None = True
    stream: bool | None = False
    return_token_ids: bool | None = False
    return_tokens_as_token_ids: bool | None = False


class LoadWeightsRequest(_Body):
    path: str = Field(min_length=1, max_length=MAX_PATH_CHARS)
    version: int | None = Field(None, ge=0)


# ---- OpenAI <-> safactory records --------------------------------------------------------
def _text_content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("text", "input_text") and "text" in part:
                parts.append(str(part["text"]))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"{where}: only text content is supported, got a {kind!r} part")
        return "\n".join(parts)
    raise APIError(400, f"{where}: content must be a string, null or a list of text parts")


def _arguments(raw: Any, where: str) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"{where}: arguments are not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise APIError(400, f"{where}: arguments are not valid JSON (nested too deeply)") from None
        except ValueError as exc:  # e.g. an integer over Python's digit limit
            raise APIError(400, f"{where}: arguments are not valid JSON ({exc})") from None
        if isinstance(value, dict):
            return value
    raise APIError(400, f"{where}: arguments must be a JSON object")


def messages_from_openai(raw: list[dict[str, Any]]) -> list[Message]:
    """OpenAI chat messages -> our Message records (raises APIError on what we cannot take)."""
    out: list[Message] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"{where}: unsupported role {role!r}")
        content = _text_content(m.get("content"), where)
        calls: list[ToolCall] = []
        if role == "assistant":
            raw_calls = m.get("tool_calls") or []
            if not isinstance(raw_calls, list):
                raise APIError(400, f"{where}.tool_calls must be a list")
            for j, tc in enumerate(raw_calls):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not fn.get("name"):
                    raise APIError(400, f"{where}.tool_calls[{j}]: needs a function with a name")
                call_id = str(tc.get("id") or f"call_{j}")
                args = _arguments(fn.get("arguments"), f"{where}.tool_calls[{j}]")
                calls.append(ToolCall(id=call_id, name=str(fn["name"]), arguments=args))
        tool_call_id = m.get("tool_call_id") if role == "tool" else None
        name = m.get("name")
        out.append(
            Message(
                role=role,
                content=content,
                tool_calls=calls,
                tool_call_id=None if tool_call_id is None else str(tool_call_id),
                name=None if name is None else str(name),
            )
        )
    return out


def tools_from_openai(raw: list[dict[str, Any]] | None) -> list[ToolSpec]:
    """OpenAI function tools -> ToolSpec."""
    specs: list[ToolSpec] = []
    for i, t in enumerate(raw or []):
        is_function = isinstance(t, dict) and t.get("type", "function") == "function"
        if not is_function or not isinstance(t.get("function"), dict):
            raise APIError(400, f"tools[{i}]: only {{'type': 'function', 'function': {{...}}}} tools are supported")
        fn = t["function"]
        if not fn.get("name"):
            raise APIError(400, f"tools[{i}]: the function needs a name")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        _check_parameters(params, f"tools[{i}].function.parameters")
        specs.append(ToolSpec(name=str(fn["name"]), description=str(fn.get("description") or ""), parameters=params))
    return specs


def _check_parameters(params: Any, where: str) -> None:
    """A tool's parameters must be a JSON Schema object whose `properties` and `required` we can read."""
    if not isinstance(params, dict):
        raise APIError(400, f"{where} must be a JSON Schema object")
    props = params.get("properties", {})
    if not isinstance(props, dict) or not all(isinstance(v, dict | bool) for v in props.values()):
        raise APIError(400, f"{where}.properties must be an object mapping each parameter name to a JSON Schema")
    required = params.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise APIError(400, f"{where}.required must be a list of parameter names")


def call_to_openai(call: ToolCall) -> dict[str, Any]:
    """A ToolCall as an OpenAI assistant `tool_calls` entry (arguments as a JSON string)."""
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def sampling_temperature(temperature: float | None) -> float:
    """The temperature to sample at: 1 when unset, 0 (greedy) as is, and a positive one no lower than
    MIN_TEMPERATURE (as vLLM does; the distribution is one-hot in float32 long before that, and dividing
    the logits by less overflows them)."""
    if temperature is None:
        return 1.0
    return 0.0 if temperature == 0 else max(temperature, MIN_TEMPERATURE)


def sampling_top_p(top_p: float | None) -> float:
    """The nucleus to sample from: 1 when unset, else no lower than MIN_TOP_P, which keeps only the most
    likely token as any lower value does (one that float32 rounds to 0 would keep none)."""
    return 1.0 if top_p is None else max(top_p, MIN_TOP_P)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """OpenAI's `stop` (one string, a list, or none) as a list without empty strings."""
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


# ---- answer shapes -----------------------------------------------------------------------
def chat_logprob(token: str, logprob: float, with_top: bool) -> dict[str, Any]:
    """One entry of a chat choice's `logprobs.content` (the sampled token is its only top alternative)."""
    data = list(token.encode("utf-8"))
    top = [{"token": token, "logprob": logprob, "bytes": data}] if with_top else []
    return {"token": token, "logprob": logprob, "bytes": data, "top_logprobs": top}


def vllm_prompt_logprob(token_id: int, logprob: float | None, text: str) -> dict[str, Any] | None:
    """One entry of vLLM's `prompt_logprobs`: {"<id>": {"logprob", "rank", "decoded_token"}} (None first)."""
    if logprob is None:
        return None
    return {str(token_id): {"logprob": logprob, "rank": None, "decoded_token": text}}


def completion_logprobs(
    tokens: list[str], logprobs: list[float | None], texts: list[str], with_top: bool
) -> dict[str, Any]:
    """A text completion choice's `logprobs`: tokens, their log-probs, top alternatives and text offsets."""
    offsets: list[int] = []
    pos = 0
    for text in texts:
        offsets.append(pos)
        pos += len(text)
    top: list[dict[str, float] | None] = [
        None if lp is None or not with_top else {t: lp} for t, lp in zip(tokens, logprobs, strict=True)
    ]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def prompt_id_lists(
    prompt: str | list[int] | list[str] | list[list[int]], tok: TinyTokenizer, add_special: bool
) -> list[list[int]]:
    """The token ids of each prompt of a completions request (a 400 for an empty one)."""
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        items = [list(prompt)]  # type: ignore[arg-type]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    out: list[list[int]] = []
    for item in items:
        if isinstance(item, str):
            ids = ([tok.bos_id] if add_special else []) + tok.encode(item)
        else:
            ids = list(item)
        if not ids:
            raise APIError(400, "prompt is empty")
        out.append(ids)
    if not out:
        raise APIError(400, "prompt is empty")
    return out
