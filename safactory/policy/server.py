"""OpenAI-compatible HTTP server around any Policy, and a recording proxy.

`create_policy_app(policy, model_name=...)` serves:

* `GET  /v1/models`
* `POST /v1/chat/completions`: OpenAI messages (tool messages, assistant `tool_calls`), `tools` in
  OpenAI function format, `n`, `temperature`, `top_p`, `max_tokens` / `max_completion_tokens`,
  `stop`, `logprobs` / `top_logprobs`. The answer is OpenAI's shape plus a top-level `safactory`
  object carrying what a training client needs and text cannot give back: the exact prompt token
  ids, each choice's sampled token ids and behaviour log-probs, and the policy version (per
  choice also `policy_versions`: every version it touched, several when weights were swapped
  mid-request). vLLM's `return_token_ids` (top-level `prompt_token_ids`, per-choice `token_ids`) and
  `return_tokens_as_token_ids` (`token_id:<id>` token strings) are honoured too.
* `POST /v1/completions`: a raw `prompt` (string, token ids, or a list of either), `max_tokens`
  (0 allowed), `echo`, `logprobs`, and vLLM's `prompt_logprobs`; with `echo` and `logprobs` the
  prompt tokens come back with their log-probs under the model (temperature 1), which is what an
  on-policy-distillation teacher needs. Needs a policy with `generate_ids` and
  `score_with_version` (LocalPolicy).
* `POST /v1/load_weights {path, version?}`: load a saved model directory as a new policy version.
  Anything wrong (missing path, other tokenizer, other shapes, a version that does not go up)
  is a clear 4xx error and the old version keeps serving.

Errors come back in OpenAI's shape (`{"error": {"message", "type", ...}}`): a bad request is a 400,
a PolicyError a 400 unless it carries a `status_code` (an EndpointError: 503 when the upstream is
down; the local engine failing under a request: 500, or 503 once it was closed), anything
unexpected a 500, so clients retry server faults and only bad requests are final. A client that
disconnects while its request generates gets its generation cancelled (the rows leave the
batch). Every endpoint takes an optional bearer token (401 without it). The assistant message's
`content` is the text the model wrote, also when it called tools, so an agent that sends the
message back re-renders the exact same tokens.

With a `ProxyRecorder`, each chat completion that passes through is stored as a trajectory of
kind "proxy" (one per returned choice, the choices of one request sharing a group id), with the
token trace, so an unmodified agent that speaks OpenAI can be trained on.
`create_proxy_app(EndpointPolicy(...), recorder)` makes that a recording pass-through in front of
any OpenAI-compatible endpoint.

Not implemented: streaming (`stream: true` is a 400), real top-k alternatives (`top_logprobs`
lists only the sampled token), `seed` (the policy's own generator decides), and `logit_bias`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from safactory.data.store import TrajectoryStore
from safactory.loopback import LoopbackHostGuard, is_loopback_host
from safactory.policy.base import Completion, Policy, PolicyError, SamplingParams
from safactory.policy.chat import PlainTextChat, tokenizer_fingerprint
from safactory.policy.local import LocalPolicy
from safactory.policy.models import load_policy_model
from safactory.policy.subword import TinyTokenizer
from safactory.types import (
    Message,
    Step,
    Task,
    TokenTrace,
    ToolCall,
    ToolSpec,
    Trajectory,
    canonical_json,
    sha256_hex,
)

log = logging.getLogger(__name__)

MAX_N = 64
T = TypeVar("T")


# ---- errors ------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def _error_kind(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def _error_response(status: int, message: str, kind: str) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
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
    path: str = Field(min_length=1)
    version: int | None = Field(None, ge=0)


# ---- what the completions endpoint needs from a policy ------------------------------------
@runtime_checkable
class TokenPolicy(Protocol):
    """A policy that continues and scores raw token ids (LocalPolicy is one)."""

    chat: PlainTextChat

    async def generate_ids(self, prompt_ids: list[int], sampling: SamplingParams) -> Completion: ...

    async def score_with_version(
        self, token_ids: list[int], temperature: float = 1.0
    ) -> tuple[list[float | None], int]: ...


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
            for j, tc in enumerate(m.get("tool_calls") or []):
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


def _call_to_openai(call: ToolCall) -> dict[str, Any]:
    arguments = json.dumps(call.arguments, ensure_ascii=False)
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


# ---- recording ---------------------------------------------------------------------------
class ProxyRecorder:
    """Stores every chat completion that passes through the server as `proxy` trajectories.

    One trajectory per returned choice; the choices of one request share a group id (the
    request id), so `n > 1` requests are ready-made GRPO groups. The task is built from the
    conversation's opening (everything before the first assistant turn), so all the turns of
    one agent episode share a task id. A failure to store is logged and counted, never raised
    into the request.
    """

    def __init__(
        self,
        store: TrajectoryStore,
        *,
        run_id: str = "proxy",
        env_id: str = "proxy",
        tags: dict[str, Any] | None = None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.env_id = env_id
        self.tags = dict(tags or {})
        self.recorded = 0
        self.failures = 0
        self.last_error: str | None = None
        self._run_created = False

    def build(
        self,
        *,
        request_id: str,
        model: str,
        messages: list[Message],
        tools: list[ToolSpec],
        completions: list[Completion],
        actions: list[Message],
        finish_reasons: list[str],
        started_at: float,
        duration_s: float,
    ) -> list[Trajectory]:
        opening: list[Message] = []
        for m in messages:
            if m.role == "assistant":
                break
            opening.append(m)
        digest = sha256_hex(canonical_json([m.model_dump(mode="json") for m in opening]))
        first_user = next((m.content for m in opening if m.role == "user"), "")
        task = Task(id=f"proxy-{digest[:16]}", env_id=self.env_id, split="proxy", prompt=first_user)
        out: list[Trajectory] = []
        for i, (c, action, finish) in enumerate(zip(completions, actions, finish_reasons, strict=True)):
            trace = None
            if c.prompt_ids is not None and c.token_ids is not None:
                logprobs = c.logprobs if c.logprobs is not None and len(c.logprobs) == len(c.token_ids) else None
                trace = TokenTrace(
                    prompt_ids=c.prompt_ids,
                    completion_ids=c.token_ids,
                    logprobs=logprobs,
                    policy_version=c.policy_version,
                    policy_versions=c.policy_versions or [c.policy_version],
                    temperature=c.temperature,
                    top_p=c.top_p,
                    finish_reason=c.finish_reason,
                )
            step = Step(index=0, action=action, trace=trace, error=c.parse_error)
            out.append(
                Trajectory(
                    run_id=self.run_id,
                    group_id=request_id,
                    kind="proxy",
                    task=task,
                    task_hash=task.hash(),
                    env_id=self.env_id,
                    env_version="1",
                    prompt=list(messages),
                    tools=list(tools),
                    steps=[step],
                    termination=finish,
                    started_at=started_at,
                    duration_s=duration_s,
                    tags={**self.tags, "model": model, "request_id": request_id, "choice": i, "n": len(completions)},
                )
            )
        return out

    async def record(self, trajectories: list[Trajectory]) -> bool:
        """Store the trajectories; False (and logged) when the store failed."""
        try:
            await asyncio.to_thread(self._add, trajectories)
        except Exception as exc:  # recording must not break serving; the failure is visible
            self.failures += 1
            self.last_error = repr(exc)
            log.exception("proxy recorder could not store %d trajectories", len(trajectories))
            return False
        self.recorded += len(trajectories)
        return True

    def _add(self, trajectories: list[Trajectory]) -> None:
        if not self._run_created:
            self.store.create_run(self.run_id, {"source": "proxy", "env_id": self.env_id})
            self._run_created = True
        self.store.add(trajectories)


# ---- the app -----------------------------------------------------------------------------
def create_policy_app(
    policy: Policy,
    *,
    model_name: str,
    token: str | None = None,
    recorder: ProxyRecorder | None = None,
    default_max_tokens: int = 256,
    load_timeout_s: float = 300.0,
    disconnect_poll_s: float = 0.5,
) -> FastAPI:
    """An OpenAI-compatible FastAPI app around `policy` (see the module docstring).

    A generating request checks every `disconnect_poll_s` seconds whether its client is still
    there; once it is gone, the generation is cancelled and the policy drops its rows.
    """
    app = FastAPI(title="safactory policy server", docs_url=None, redoc_url=None, openapi_url=None)
    load_lock = asyncio.Lock()

    async def check_token(request: Request) -> None:
        if not token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise APIError(401, "missing or wrong bearer token", "authentication_error")

    app.router.dependencies.append(Depends(check_token))

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in exc.errors()[:5]
        )
        return _error_response(400, f"invalid request: {problems}", "invalid_request_error")

    @app.exception_handler(PolicyError)
    async def _policy_error(_request: Request, exc: PolicyError) -> JSONResponse:
        status = int(getattr(exc, "status_code", 400))
        return _error_response(status, str(exc), "policy_error" if status < 500 else "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error_response(exc.status_code, str(exc.detail), _error_kind(exc.status_code))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
        # the server re-raises it after this answer, so its traceback is logged there
        return _error_response(500, f"internal server error: {exc!r}", "server_error")

    async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
        """Await `work` as a task; if the client goes away first, cancel it (the policy drops its rows)."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=disconnect_poll_s)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    raise APIError(499, "the client closed the request; its generation was cancelled")
        finally:
            if not task.done():  # this handler itself was cancelled
                task.cancel()

    def current_version() -> int | None:
        version = getattr(policy, "version", None)
        return version if isinstance(version, int) else None

    def check_model(requested: str | None) -> None:
        if requested and requested != model_name:
            raise APIError(404, f"model {requested!r} not found; this server serves {model_name!r}", "not_found_error")

    def token_str(token_id: int, as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{token_id}"
        tok = getattr(getattr(policy, "chat", None), "tokenizer", None)
        if isinstance(tok, TinyTokenizer):
            return tok.decode([token_id], skip_special=False)
        return f"token_id:{token_id}"

    def default_chat_max_tokens(messages: list[Message], tools: list[ToolSpec]) -> int:
        """`default_max_tokens`, capped (like vLLM) by what is left of the model's context.

        Any chat renderer with `prompt_ids` counts (plain text or a chat template), tools included.
        """
        prompt_ids = getattr(getattr(policy, "chat", None), "prompt_ids", None)
        positions = getattr(policy, "max_positions", None)
        if callable(prompt_ids) and isinstance(positions, int):
            try:
                room = positions - len(prompt_ids(messages, tools))
            except Exception:  # a prompt that cannot render fails in generate, with its own error
                return default_max_tokens
            if room > 0:
                return min(default_max_tokens, room)
        return default_max_tokens

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        card = {
            "id": model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "safactory",
            "policy_version": current_version(),
        }
        max_len = getattr(policy, "max_positions", None)
        if isinstance(max_len, int):
            card["max_model_len"] = max_len
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> dict[str, Any]:
        check_model(body.model)
        if body.stream:
            raise APIError(400, "streaming is not supported by this server; send stream=false")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true")  # as OpenAI answers
        messages = messages_from_openai(body.messages)
        tools = tools_from_openai(body.tools)
        use_tools = bool(tools) and body.tool_choice != "none"
        sampling = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            max_tokens=body.max_completion_tokens or body.max_tokens or default_chat_max_tokens(messages, tools),
            stop=_stops(body.stop),
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        started = time.time()
        work = asyncio.gather(*(policy.generate(messages, tools, sampling) for _ in range(body.n)))
        completions = list(await unless_disconnected(request, work))
        duration = time.time() - started

        as_ids = bool(body.return_tokens_as_token_ids)
        choices: list[dict[str, Any]] = []
        extra_choices: list[dict[str, Any]] = []
        actions: list[Message] = []
        finishes: list[str] = []
        for i, c in enumerate(completions):
            calls = [
                call.model_copy(update={"id": f"call_{request_id[-12:]}_{i}_{j}"})
                for j, call in enumerate(c.tool_calls if use_tools else [])
            ]
            policy_parse_error = c.parse_error  # passed on as the policy said it, for exact replay
            if not use_tools:  # no tools on offer: plain text is the answer, not a failed tool call
                c = completions[i] = c.model_copy(update={"parse_error": None})
            action = Message(role="assistant", content=c.text, tool_calls=calls)
            finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            if calls:
                message["tool_calls"] = [_call_to_openai(call) for call in calls]
            choice: dict[str, Any] = {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
            has_logprobs = c.token_ids is not None and c.logprobs is not None and len(c.token_ids) == len(c.logprobs)
            if body.logprobs and has_logprobs:
                choice["logprobs"] = {
                    "content": [
                        _chat_logprob(token_str(t, as_ids), lp, bool(body.top_logprobs))
                        for t, lp in zip(c.token_ids, c.logprobs, strict=True)
                    ],
                    "refusal": None,
                }
            if body.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
            extra_choices.append(
                {
                    "index": i,
                    "token_ids": c.token_ids,
                    "logprobs": c.logprobs,
                    "policy_version": c.policy_version,
                    "policy_versions": c.policy_versions or [c.policy_version],
                    "finish_reason": c.finish_reason,
                    "parse_error": policy_parse_error,
                    "temperature": c.temperature,
                    "top_p": c.top_p,
                }
            )
            actions.append(action)
            finishes.append(finish)

        prompt_ids = completions[0].prompt_ids
        n_prompt = len(prompt_ids) if prompt_ids is not None else 0
        n_completion = sum(len(c.token_ids or []) for c in completions)
        version = completions[0].policy_version
        response: dict[str, Any] = {
            "id": request_id,
            "object": "chat.completion",
            "created": int(started),
            "model": model_name,
            "system_fingerprint": f"safactory-v{version}",
            "choices": choices,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_completion,
                "total_tokens": n_prompt + n_completion,
            },
            "safactory": {"policy_version": version, "prompt_token_ids": prompt_ids, "choices": extra_choices},
        }
        if body.return_token_ids:
            response["prompt_token_ids"] = prompt_ids
        if recorder is not None:
            trajectories = recorder.build(
                request_id=request_id,
                model=model_name,
                messages=messages,
                tools=tools,
                completions=completions,
                actions=actions,
                finish_reasons=finishes,
                started_at=started,
                duration_s=duration,
            )
            response["safactory"]["recorded"] = await recorder.record(trajectories)
            response["safactory"]["trajectory_ids"] = [t.id for t in trajectories]
        return response

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> dict[str, Any]:
        check_model(body.model)
        if body.stream:
            raise APIError(400, "streaming is not supported by this server; send stream=false")
        if not isinstance(policy, TokenPolicy):
            raise APIError(501, "this policy does not take raw prompts; use /v1/chat/completions", "not_implemented")
        tok = policy.chat.tokenizer
        prompts = _prompt_ids(body.prompt, tok, bool(body.add_special_tokens))
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        sampling = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            max_tokens=max_tokens,
            stop=_stops(body.stop),
        )
        want_logprobs = body.logprobs is not None
        want_prompt_lp = (bool(body.echo) and want_logprobs) or body.prompt_logprobs is not None
        as_ids = bool(body.return_tokens_as_token_ids)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        started = time.time()

        async def one_prompt(ids: list[int]) -> tuple[list[float | None] | None, int | None, list[Completion]]:
            scored: tuple[list[float | None], int] | None = None
            if want_prompt_lp:
                scored = await policy.score_with_version(ids)
            outs = await asyncio.gather(*(policy.generate_ids(ids, sampling) for _ in range(body.n)))
            return (scored[0] if scored else None), (scored[1] if scored else None), list(outs)

        results = await unless_disconnected(request, asyncio.gather(*(one_prompt(ids) for ids in prompts)))
        choices: list[dict[str, Any]] = []
        extra_choices: list[dict[str, Any]] = []
        n_completion = 0
        for p, (ids, (prompt_lp, score_version, outs)) in enumerate(zip(prompts, results, strict=True)):
            prompt_text = tok.decode(ids)
            for j, c in enumerate(outs):
                out_ids = c.token_ids or []
                out_lp = list(c.logprobs or [])
                n_completion += len(out_ids)
                text = (prompt_text if body.echo else "") + c.text
                choice: dict[str, Any] = {
                    "index": p * body.n + j,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                if want_logprobs:
                    shown_ids = (ids if body.echo else []) + out_ids
                    shown_lp: list[float | None] = (list(prompt_lp or []) if body.echo else []) + list(out_lp)
                    choice["logprobs"] = _completion_logprobs(
                        [token_str(t, as_ids) for t in shown_ids],
                        shown_lp,
                        [tok.decode([t]) for t in shown_ids],
                        bool(body.logprobs),
                    )
                if body.prompt_logprobs is not None and prompt_lp is not None:
                    choice["prompt_logprobs"] = [
                        _vllm_prompt_logprob(t, lp, token_str(t, False)) for t, lp in zip(ids, prompt_lp, strict=True)
                    ]
                if body.return_token_ids:
                    choice["prompt_token_ids"] = ids
                    choice["token_ids"] = out_ids
                choices.append(choice)
                extra = {
                    "index": p * body.n + j,
                    "prompt_token_ids": ids,
                    "token_ids": out_ids,
                    "logprobs": out_lp,
                    "policy_version": c.policy_version,
                    "policy_versions": c.policy_versions or [c.policy_version],
                    "finish_reason": c.finish_reason,
                }
                if prompt_lp is not None:
                    extra["prompt_logprobs"] = prompt_lp
                    extra["prompt_logprobs_version"] = score_version
                extra_choices.append(extra)
        n_prompt = sum(len(ids) for ids in prompts)
        version = extra_choices[0]["policy_version"] if extra_choices else current_version()
        return {
            "id": request_id,
            "object": "text_completion",
            "created": int(started),
            "model": model_name,
            "system_fingerprint": f"safactory-v{version}",
            "choices": choices,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_completion,
                "total_tokens": n_prompt + n_completion,
            },
            "safactory": {"policy_version": version, "choices": extra_choices},
        }

    @app.post("/v1/load_weights")
    async def load_weights(body: LoadWeightsRequest) -> dict[str, Any]:
        if not isinstance(policy, LocalPolicy):
            raise APIError(501, "this policy cannot load weights", "not_implemented")
        async with load_lock:
            previous = policy.version
            if body.version is not None and body.version <= previous:
                raise APIError(
                    409, f"version {body.version} does not go up from the serving version {previous}", "conflict"
                )
            if not Path(body.path).is_dir():  # a local directory only: never a hub id to download
                raise APIError(
                    400, f"could not load a model from {body.path!r}: not a directory; version {previous} keeps serving"
                )
            try:
                loaded = await asyncio.wait_for(asyncio.to_thread(load_policy_model, body.path), load_timeout_s)
            except TimeoutError:
                raise APIError(
                    504, f"loading {body.path!r} took over {load_timeout_s} s; version {previous} keeps serving"
                ) from None
            except Exception as exc:
                raise APIError(
                    400, f"could not load a model from {body.path!r}: {exc}; version {previous} keeps serving"
                ) from None
            if tokenizer_fingerprint(loaded.chat.tokenizer) != tokenizer_fingerprint(policy.chat.tokenizer):
                raise APIError(400, f"{body.path!r} uses another tokenizer; version {previous} keeps serving")
            state = loaded.model.state_dict()
            problem = _state_mismatch(policy.model.state_dict(), state)
            if problem:
                message = f"{body.path!r} does not fit the served model: {problem}; version {previous} keeps serving"
                raise APIError(400, message)
            try:
                version = await policy.publish(state, body.version)
            except Exception as exc:
                raise APIError(500, f"swapping in the weights failed: {exc!r}", "server_error") from None
        log.info("loaded %s as policy version %d (was %d)", body.path, version, previous)
        return {"object": "load_weights", "policy_version": version, "previous_version": previous, "path": body.path}

    return app


def create_proxy_app(
    upstream_policy: Policy,
    recorder: ProxyRecorder,
    *,
    model_name: str = "proxy",
    token: str | None = None,
) -> FastAPI:
    """A recording pass-through: `create_policy_app` with a recorder around any Policy."""
    return create_policy_app(upstream_policy, model_name=model_name, token=token, recorder=recorder)


def _chat_logprob(token: str, logprob: float, with_top: bool) -> dict[str, Any]:
    data = list(token.encode("utf-8"))
    top = [{"token": token, "logprob": logprob, "bytes": data}] if with_top else []
    return {"token": token, "logprob": logprob, "bytes": data, "top_logprobs": top}


def _vllm_prompt_logprob(token_id: int, logprob: float | None, text: str) -> dict[str, Any] | None:
    """One entry of vLLM's `prompt_logprobs`: {"<id>": {"logprob", "rank", "decoded_token"}} (None first)."""
    if logprob is None:
        return None
    return {str(token_id): {"logprob": logprob, "rank": None, "decoded_token": text}}


def _completion_logprobs(
    tokens: list[str], logprobs: list[float | None], texts: list[str], with_top: bool
) -> dict[str, Any]:
    offsets: list[int] = []
    pos = 0
    for text in texts:
        offsets.append(pos)
        pos += len(text)
    top: list[dict[str, float] | None] = [
        None if lp is None or not with_top else {t: lp} for t, lp in zip(tokens, logprobs, strict=True)
    ]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def _prompt_ids(
    prompt: str | list[int] | list[str] | list[list[int]], tok: TinyTokenizer, add_special: bool
) -> list[list[int]]:
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


def _state_mismatch(current: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> str:
    missing = sorted(set(current) - set(new))
    unexpected = sorted(set(new) - set(current))
    if missing:
        return f"missing {missing[:3]}"
    if unexpected:
        return f"unexpected {unexpected[:3]}"
    for key, value in current.items():
        if tuple(new[key].shape) != tuple(value.shape):
            return f"{key} has shape {tuple(new[key].shape)}, the served model {tuple(value.shape)}"
    return ""


# ---- binding and serving -----------------------------------------------------------------
def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if not is_loopback_host(host) and not token:
        raise ValueError(
            f"refusing to serve the policy on non-loopback host {host!r} without a token: "
            "anyone who can reach it could sample from the model and load weights from any path. "
            "Pass a token (clients send it as `Authorization: Bearer <token>`) or bind to 127.0.0.1."
        )


def serve_policy(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    *,
    model_name: str | None = None,
    device: str | None = None,
) -> None:
    """Load a model (`tiny`, `smollm2` or a saved directory), wrap it in a LocalPolicy and serve it."""
    check_bind(host, token)
    loaded = load_policy_model(str(model_dir))
    model = loaded.model.to(device) if device is not None else loaded.model
    policy = LocalPolicy(model, loaded.chat)
    app: Any = create_policy_app(policy, model_name=model_name or Path(model_dir).resolve().name, token=token)
    if not token:  # loopback only: refuse requests that a web page made through DNS rebinding
        app = LoopbackHostGuard(app)
    uvicorn.run(app, host=host, port=port, log_level="info")


class BackgroundServer:
    """Runs an ASGI app with uvicorn in a daemon thread (tests, an in-process teacher or proxy).

    Port 0 picks a free port; `url` is the OpenAI base URL (ending in /v1).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="safactory-policy-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on {self.host}:{self.port} failed to start")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server on {self.host}:{self.port} did not start within {timeout_s} s")
            time.sleep(0.01)
        sockets = [s for server in self._server.servers for s in server.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "APIError",
    "BackgroundServer",
    "ChatRequest",
    "CompletionRequest",
    "LoadWeightsRequest",
    "ProxyRecorder",
    "TokenPolicy",
    "check_bind",
    "create_policy_app",
    "create_proxy_app",
    "messages_from_openai",
    "serve_policy",
    "tools_from_openai",
]
