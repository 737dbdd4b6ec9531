"""EndpointPolicy: the Policy protocol against any OpenAI-compatible endpoint (vLLM, SGLang, ours).

Spec string: `openai:<base_url>#<model>`, e.g. `openai:http://127.0.0.1:8000/v1#tiny`. A base URL
without a path gets `/v1` appended.

Requests go through the official `openai` client with its own retries off (`max_retries=0`);
this class retries connection errors, timeouts, 429 and 5xx a bounded number of times with
exponential backoff and then raises an `EndpointError` (a PolicyError) that says the endpoint is
down. Other 4xx answers are not retried: the request itself was refused.

Tools are sent in OpenAI function format; returned `tool_calls` become ToolCalls, and arguments
that are not a JSON object become `parse_error` (never an exception). Log-probs are always
requested and fill `Completion.logprobs`.

Exact token ids, when the server gives them (first that is present wins):

* our server: the top-level `safactory` object (prompt ids, completion ids, behaviour
  log-probs, policy version, parse error);
* vLLM with `return_token_ids` (v0.10.2+): top-level `prompt_token_ids`, per-choice `token_ids`;
* SGLang with `return_prompt_token_ids` / `return_token_ids`: per-choice `prompt_token_ids` and
  `token_ids`;
* vLLM's `return_tokens_as_token_ids`: log-prob tokens spelled `token_id:<id>` give the
  completion ids (older vLLM; no prompt ids, so no token trace).

These request fields are sent as `extra_body` (unknown fields are ignored by vLLM, with a warning,
and by SGLang); pass `token_ids=False` for endpoints that reject unknown fields (api.openai.com).

Which log-probs come back is the server's choice, and for training they must be those of the
distribution actually sampled from: vLLM reports raw model log-probs (before temperature and
top-p) unless started with `--logprobs-mode processed_logprobs`; SGLang reports
log_softmax(logits / temperature) before top-p/top-k; our server reports the sampling
distribution (temperature and top-p applied). Use temperature 1 and top_p 1, or configure the
server as above, when these log-probs are behaviour log-probs for PPO.

`score(token_ids)` asks `/v1/completions` with `echo` and `logprobs` for the log-prob of each
token given its prefix (None for the first): teacher log-probs for on-policy distillation.
It sends `max_tokens=1` (SGLang refuses 0) and keeps the prompt's part of the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import openai
from openai import AsyncOpenAI
from pydantic import BaseModel

from safactory.policy.base import Completion, PolicyError, SamplingParams
from safactory.types import Message, ToolCall, ToolSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

# vLLM: return_token_ids, return_tokens_as_token_ids; SGLang: return_prompt_token_ids, return_token_ids
TOKEN_ID_FIELDS = {"return_token_ids": True, "return_prompt_token_ids": True, "return_tokens_as_token_ids": True}
RETRYABLE = (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError)


class EndpointError(PolicyError):
    """A PolicyError from an endpoint; `status_code` is what a proxy in front of us should answer."""

    def __init__(self, message: str, status_code: int = 502) -> None:
        super().__init__(message)
        self.status_code = status_code


class EndpointPolicy:
    """A Policy served by an OpenAI-compatible endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_attempts: int = 3,
        backoff_s: float = 0.5,
        timeout_s: float = 120.0,
        token_ids: bool = True,
        extra_body: dict[str, Any] | None = None,
        version: int = 0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.base_url = _normalise_base_url(base_url)
        self.model = model
        self.api_key = api_key or "EMPTY"  # local servers need some key; never read from the environment
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.token_ids = token_ids
        self.extra_body = dict(extra_body or {})
        self.version = version
        self._client: AsyncOpenAI | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_spec(cls, spec: str, api_key: str | None = None, **kwargs: Any) -> EndpointPolicy:
        """`openai:<base_url>#<model>` -> EndpointPolicy."""
        scheme, sep, rest = spec.partition(":")
        if scheme != "openai" or not sep:
            raise ValueError(f"endpoint spec {spec!r} must look like 'openai:<base_url>#<model>'")
        base_url, sep, model = rest.rpartition("#")
        if not sep or not base_url or not model:
            raise ValueError(f"endpoint spec {spec!r} names no model: use 'openai:<base_url>#<model>'")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"endpoint spec {spec!r}: {base_url!r} is not an http(s) URL")
        return cls(base_url, model, api_key=api_key, **kwargs)

    @property
    def spec(self) -> str:
        return f"openai:{self.base_url}#{self.model}"

    # ---- the client ----------------------------------------------------------------------
    def client(self) -> AsyncOpenAI:
        """One AsyncOpenAI per event loop (its connection pool belongs to the loop that made it)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = AsyncOpenAI(
                base_url=self.base_url, api_key=self.api_key, max_retries=0, timeout=self.timeout_s
            )
            self._client_loop = loop
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.close()
            except Exception:  # closing a client of a finished loop is best effort
                pass
        self._client = None
        self._client_loop = None

    async def _call(self, what: str, fn: Callable[[AsyncOpenAI], Awaitable[T]]) -> T:
        """`fn(client)` with bounded retries and exponential backoff, then a clear EndpointError."""
        last: Exception | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return await fn(self.client())
            except RETRYABLE as exc:
                last = exc
                n = self.max_attempts
                log.warning("%s on %s failed (attempt %d/%d): %r", what, self.base_url, attempt + 1, n, exc)
            except openai.APIStatusError as exc:
                status = 400 if exc.status_code in (400, 404, 413, 422) else 502
                raise EndpointError(
                    f"{self.base_url} refused the {what} request (HTTP {exc.status_code}): {_error_text(exc)}", status
                ) from exc
            except openai.OpenAIError as exc:
                raise EndpointError(f"{what} on {self.base_url} failed: {exc!r}") from exc
            except ValueError as exc:  # the body is not JSON (the client's own parse of it failed)
                raise EndpointError(
                    f"{self.base_url} answered the {what} request with a malformed body: {exc}"
                ) from exc
        raise EndpointError(
            f"endpoint {self.base_url} is down or unreachable: {what} failed {self.max_attempts} times "
            f"(bounded retries with backoff); last error: {last!r}",
            503,
        ) from last

    # ---- Policy --------------------------------------------------------------------------
    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [message_to_openai(m) for m in messages],
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "logprobs": True,
            "n": 1,
        }
        if tools:
            kwargs["tools"] = [tool_to_openai(t) for t in tools]
        if sampling.stop:
            kwargs["stop"] = list(sampling.stop)
        extra = dict(self.extra_body)
        if self.token_ids:
            extra.update(TOKEN_ID_FIELDS)
        if extra:
            kwargs["extra_body"] = extra

        async def call(client: AsyncOpenAI) -> Any:
            return await client.chat.completions.create(**kwargs)

        response = await self._call("chat completion", call)
        data = response.model_dump(warnings=False) if isinstance(response, BaseModel) else response
        try:
            return completion_from_response(data, sampling, default_version=self.version)
        except EndpointError as exc:
            raise EndpointError(f"{self.base_url}: {exc}") from exc

    async def score(self, token_ids: list[int]) -> list[float | None]:
        """Log-prob of each token given its prefix (None for the first), at temperature 1."""
        if not token_ids:
            raise PolicyError("nothing to score: no token ids")
        extra = dict(self.extra_body)
        if self.token_ids:
            extra["return_tokens_as_token_ids"] = True

        async def call(client: AsyncOpenAI) -> Any:
            return await client.completions.create(
                model=self.model,
                prompt=list(token_ids),
                max_tokens=1,
                echo=True,
                logprobs=1,
                temperature=1.0,
                extra_body=extra or None,
            )

        response = await self._call("prompt scoring", call)
        data = response.model_dump()
        try:
            lp = data["choices"][0]["logprobs"]["token_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.base_url} returned no prompt log-probs for echo+logprobs") from None
        if not isinstance(lp, list) or len(lp) < len(token_ids):
            n = len(lp) if isinstance(lp, list) else 0
            raise EndpointError(f"{self.base_url} returned {n} log-probs for {len(token_ids)} prompt tokens")
        try:
            out: list[float | None] = [None if v is None else float(v) for v in lp[: len(token_ids)]]
        except (TypeError, ValueError) as exc:
            raise EndpointError(f"{self.base_url} returned log-probs that are not numbers: {exc}") from None
        out[0] = None
        return out

    async def load_weights(self, path: str, version: int | None = None) -> int:
        """Ask a safactory policy server to load a saved model directory; returns the new version."""
        body: dict[str, Any] = {"path": path}
        if version is not None:
            body["version"] = version

        async def call(client: AsyncOpenAI) -> Any:
            return await client.post("/load_weights", body=body, cast_to=object)

        data = await self._call("load_weights", call)
        if not isinstance(data, dict) or not isinstance(data.get("policy_version"), int):
            raise EndpointError(f"{self.base_url} gave no policy_version for load_weights: {data!r}")
        self.version = data["policy_version"]
        return self.version


# ---- mapping ---------------------------------------------------------------------------------
def completion_from_response(
    data: dict[str, Any], sampling: SamplingParams, *, default_version: int = 0, choice_index: int = 0
) -> Completion:
    """An OpenAI chat completion response (as a dict) -> our Completion.

    Bad tool calls become `parse_error`; a response of any other wrong shape (a part missing,
    of the wrong type, a log-prob that is not a number) raises an EndpointError that says so.
    """
    try:
        return _completion(data, sampling, default_version, choice_index)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise EndpointError(f"the endpoint answered with a malformed chat completion: {exc!r}"[:500]) from exc


def _completion(data: dict[str, Any], sampling: SamplingParams, default_version: int, choice_index: int) -> Completion:
    choices = data.get("choices") or []
    if not choices or choice_index >= len(choices):
        raise EndpointError("the endpoint answered without choices")
    choice = choices[choice_index]
    message = choice.get("message") or {}
    text = message.get("content") or ""
    calls, parse_error = _tool_calls(message.get("tool_calls") or [])

    lp_entries = ((choice.get("logprobs") or {}).get("content")) or []
    logprobs: list[float] | None = [float(e["logprob"]) for e in lp_entries] if lp_entries else None
    prompt_ids: list[int] | None = None
    token_ids: list[int] | None = None
    version = default_version
    policy_versions: list[int] = []
    finish = choice.get("finish_reason") or "stop"
    finish = "stop" if finish == "tool_calls" else finish

    ours = data.get("safactory")
    our_choice = None
    if isinstance(ours, dict):
        our_choices = ours.get("choices") or []
        our_choice = next((c for c in our_choices if c.get("index") == choice.get("index", choice_index)), None)
    if our_choice is not None:
        prompt_ids = ours.get("prompt_token_ids")
        token_ids = our_choice.get("token_ids")
        logprobs = our_choice.get("logprobs", logprobs)
        version = int(our_choice.get("policy_version", ours.get("policy_version", default_version)))
        versions = our_choice.get("policy_versions")
        if isinstance(versions, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in versions):
            policy_versions = list(versions)
        finish = our_choice.get("finish_reason") or finish
        parse_error = parse_error or our_choice.get("parse_error")
    else:
        prompt_ids = data.get("prompt_token_ids") or choice.get("prompt_token_ids")  # vLLM, SGLang
        token_ids = choice.get("token_ids")
        if token_ids is None and lp_entries:
            token_ids = _ids_from_token_strings([str(e.get("token", "")) for e in lp_entries])
    if token_ids is not None and logprobs is not None and len(token_ids) != len(logprobs):
        n_ids, n_lp = len(token_ids), len(logprobs)
        log.warning("endpoint gave %d token ids but %d log-probs; dropping the log-probs", n_ids, n_lp)
        logprobs = None
    return Completion(
        text=text,
        tool_calls=calls,
        parse_error=parse_error,
        prompt_ids=list(prompt_ids) if prompt_ids is not None else None,
        token_ids=list(token_ids) if token_ids is not None else None,
        logprobs=logprobs,
        policy_version=version,
        policy_versions=policy_versions,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        finish_reason=finish,
    )


def _tool_calls(raw: list[dict[str, Any]]) -> tuple[list[ToolCall], str | None]:
    calls: list[ToolCall] = []
    for i, tc in enumerate(raw):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            return [], f"tool call {i} has no function name"
        arguments = fn.get("arguments")
        if isinstance(arguments, dict):
            args: Any = arguments
        else:
            try:
                args = json.loads(arguments) if arguments else {}
            except (ValueError, TypeError, RecursionError) as exc:  # also too deep, or an over-long integer
                return [], f"tool call {fn['name']!r}: arguments are not valid JSON ({exc}): {str(arguments)[:80]!r}"
        if not isinstance(args, dict):
            return [], f"tool call {fn['name']!r}: arguments must be a JSON object, got {type(args).__name__}"
        calls.append(ToolCall(id=str(tc.get("id") or f"call_{i}"), name=str(fn["name"]), arguments=args))
    return calls, None


def _ids_from_token_strings(tokens: list[str]) -> list[int] | None:
    """vLLM's `return_tokens_as_token_ids` spells each token `token_id:<id>`; anything else -> None."""
    ids: list[int] = []
    for token in tokens:
        head, sep, tail = token.partition(":")
        if head != "token_id" or not sep or not tail.lstrip("-").isdigit():
            return None
        ids.append(int(tail))
    return ids


def message_to_openai(message: Message) -> dict[str, Any]:
    """Message -> an OpenAI chat message (assistant tool calls with JSON-string arguments)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.role == "assistant" and message.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
            }
            for c in message.tool_calls
        ]
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id or ""
    return out


def tool_to_openai(spec: ToolSpec) -> dict[str, Any]:
    """ToolSpec -> an OpenAI function tool."""
    return {
        "type": "function",
        "function": {"name": spec.name, "description": spec.description, "parameters": spec.parameters},
    }


def _normalise_base_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    if urlsplit(url).path in ("", "/"):
        url += "/v1"
    return url


def _error_text(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(body.get("detail"), str):
            return body["detail"]
    return str(exc.message)


__all__ = ["EndpointError", "EndpointPolicy", "completion_from_response", "message_to_openai", "tool_to_openai"]
