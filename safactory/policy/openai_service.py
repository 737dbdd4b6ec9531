"""The OpenAI-compatible endpoints' logic: `PolicyService` answers each route of the policy server.

One `PolicyService` per app holds what the routes share: the policy, the served model name, the
bearer token, the optional recorder, the lock that serialises weight loads, and the defaults.
Its methods are the route handlers (`create_policy_app` in `safactory.policy.server` mounts them)
plus what they need: the token check, cancelling a generation whose client went away, and turning
completions into OpenAI's (and vLLM's) answer shapes with the `safactory` extras.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from fastapi import Request

from safactory.policy.base import Completion, Policy, SamplingParams
from safactory.policy.chat import PlainTextChat, tokenizer_fingerprint
from safactory.policy.local import LocalPolicy
from safactory.policy.models import ADAPTER_CONFIG, load_policy_model
from safactory.policy.openai_wire import (
    APIError,
    ChatRequest,
    CompletionRequest,
    LoadWeightsRequest,
    call_to_openai,
    chat_logprob,
    completion_logprobs,
    messages_from_openai,
    prompt_id_lists,
    sampling_temperature,
    sampling_top_p,
    stop_strings,
    tools_from_openai,
    vllm_prompt_logprob,
)
from safactory.policy.recorder import ProxyRecorder
from safactory.policy.subword import TinyTokenizer
from safactory.request_limits import shorten
from safactory.types import Message, ToolCall, ToolSpec

log = logging.getLogger(__name__)

T = TypeVar("T")


@runtime_checkable
class TokenPolicy(Protocol):
    """A policy that continues and scores raw token ids (LocalPolicy is one): what /v1/completions needs."""

    chat: PlainTextChat

    async def generate_ids(self, prompt_ids: list[int], sampling: SamplingParams) -> Completion: ...

    async def score_with_version(
        self, token_ids: list[int], temperature: float = 1.0
    ) -> tuple[list[float | None], int]: ...


class PolicyService:
    """The route handlers of one policy server and the state they share (see the server's module docstring)."""

    def __init__(
        self,
        policy: Policy,
        *,
        model_name: str,
        token: str | None = None,
        recorder: ProxyRecorder | None = None,
        default_max_tokens: int = 256,
        load_timeout_s: float = 300.0,
        disconnect_poll_s: float = 0.5,
    ) -> None:
        self.policy = policy
        self.model_name = model_name
        self.token = token
        self.recorder = recorder
        self.default_max_tokens = default_max_tokens
        self.load_timeout_s = load_timeout_s
        self.disconnect_poll_s = disconnect_poll_s
        self.load_lock = asyncio.Lock()

    # ---- shared checks -----------------------------------------------------------------
    async def check_token(self, request: Request) -> None:
        """The dependency of every route: a 401 unless the request carries the bearer token (when one is set)."""
        if not self.token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise APIError(401, "missing or wrong bearer token", "authentication_error")

    async def unless_disconnected(self, request: Request, work: Awaitable[T]) -> T:
        """Await `work` as a task; if the client goes away first, cancel it (the policy drops its rows)."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.disconnect_poll_s)
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

    def current_version(self) -> int | None:
        version = getattr(self.policy, "version", None)
        return version if isinstance(version, int) else None

    def check_model(self, requested: str | None) -> None:
        if requested and requested != self.model_name:
            raise APIError(
                404, f"model {requested!r} not found; this server serves {self.model_name!r}", "not_found_error"
            )

    def token_str(self, token_id: int, as_ids: bool) -> str:
        """A token as a logprobs entry names it: its text for our own tokenizer, else `token_id:<id>`."""
        if as_ids:
            return f"token_id:{token_id}"
        tok = getattr(getattr(self.policy, "chat", None), "tokenizer", None)
        if isinstance(tok, TinyTokenizer):
            return tok.decode([token_id], skip_special=False)
        return f"token_id:{token_id}"

    def default_chat_max_tokens(self, messages: list[Message], tools: list[ToolSpec]) -> int:
        """`default_max_tokens`, capped (like vLLM) by what is left of the model's context.

        Any chat renderer with `prompt_ids` counts (plain text or a chat template), tools included.
        """
        prompt_ids = getattr(getattr(self.policy, "chat", None), "prompt_ids", None)
        positions = getattr(self.policy, "max_positions", None)
        if callable(prompt_ids) and isinstance(positions, int):
            try:
                room = positions - len(prompt_ids(messages, tools))
            except Exception:  # a prompt that cannot render fails in generate, with its own error
                return self.default_max_tokens
            if room > 0:
                return min(self.default_max_tokens, room)
        return self.default_max_tokens

    def _answer_head(self, request_id: str, kind: str, started: float, version: int | None) -> dict[str, Any]:
        """The fields a completion answer opens with (its `choices`, `usage` and `safactory` follow)."""
        return {
            "id": request_id,
            "object": kind,
            "created": int(started),
            "model": self.model_name,
            "system_fingerprint": f"safactory-v{version}",
        }

    # ---- GET /v1/models ----------------------------------------------------------------
    async def list_models(self) -> dict[str, Any]:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "safactory",
            "policy_version": self.current_version(),
        }
        max_len = getattr(self.policy, "max_positions", None)
        if isinstance(max_len, int):
            card["max_model_len"] = max_len
        return {"object": "list", "data": [card]}

    # ---- POST /v1/chat/completions -----------------------------------------------------
    async def chat_completions(self, body: ChatRequest, request: Request) -> dict[str, Any]:
        self.check_model(body.model)
        if body.stream:
            raise APIError(400, "streaming is not supported by this server; send stream=false")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true")  # as OpenAI answers
        messages = messages_from_openai(body.messages)
        tools = tools_from_openai(body.tools)
        use_tools = bool(tools) and body.tool_choice != "none"
        sampling = SamplingParams(
            temperature=sampling_temperature(body.temperature),
            top_p=sampling_top_p(body.top_p),
            max_tokens=body.max_completion_tokens or body.max_tokens or self.default_chat_max_tokens(messages, tools),
            stop=stop_strings(body.stop),
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        started = time.time()
        work = asyncio.gather(*(self.policy.generate(messages, tools, sampling) for _ in range(body.n)))
        completions = list(await self.unless_disconnected(request, work))
        duration = time.time() - started
        choices, extra_choices, actions, finishes = self._chat_choices(body, request_id, completions, use_tools)

        prompt_ids = completions[0].prompt_ids
        n_prompt = len(prompt_ids) if prompt_ids is not None else 0
        n_completion = sum(len(c.token_ids or []) for c in completions)
        version = completions[0].policy_version
        response: dict[str, Any] = {
            **self._answer_head(request_id, "chat.completion", started, version),
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
        if self.recorder is not None:
            trajectories = self.recorder.build(
                request_id=request_id,
                model=self.model_name,
                messages=messages,
                tools=tools,
                completions=completions,
                actions=actions,
                finish_reasons=finishes,
                started_at=started,
                duration_s=duration,
            )
            response["safactory"]["recorded"] = await self.recorder.record(trajectories)
            response["safactory"]["trajectory_ids"] = [t.id for t in trajectories]
        return response

    def _chat_choices(
        self, body: ChatRequest, request_id: str, completions: list[Completion], use_tools: bool
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Message], list[str]]:
        """Each completion's OpenAI choice, `safactory` extra, assistant message and finish reason.

        Without tools on offer, plain text is the answer and not a failed tool call: the parse error
        is dropped from the completion in `completions` itself, and kept in the extra (as the policy
        said it, for exact replay).
        """
        choices: list[dict[str, Any]] = []
        extra_choices: list[dict[str, Any]] = []
        actions: list[Message] = []
        finishes: list[str] = []
        for i, c in enumerate(completions):
            calls = [
                call.model_copy(update={"id": f"call_{request_id[-12:]}_{i}_{j}"})
                for j, call in enumerate(c.tool_calls if use_tools else [])
            ]
            policy_parse_error = c.parse_error
            if not use_tools:
                c = completions[i] = c.model_copy(update={"parse_error": None})
            action = Message(role="assistant", content=c.text, tool_calls=calls)
            finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
            choices.append(self._chat_choice(body, i, c, calls, finish))
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
        return choices, extra_choices, actions, finishes

    def _chat_choice(
        self, body: ChatRequest, index: int, c: Completion, calls: list[ToolCall], finish: str
    ) -> dict[str, Any]:
        """One OpenAI chat choice: the assistant message, its log-probs if asked, vLLM's token ids if asked."""
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        if calls:
            message["tool_calls"] = [call_to_openai(call) for call in calls]
        choice: dict[str, Any] = {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
        has_logprobs = c.token_ids is not None and c.logprobs is not None and len(c.token_ids) == len(c.logprobs)
        if body.logprobs and has_logprobs:
            as_ids = bool(body.return_tokens_as_token_ids)
            choice["logprobs"] = {
                "content": [
                    chat_logprob(self.token_str(t, as_ids), lp, bool(body.top_logprobs))
                    for t, lp in zip(c.token_ids, c.logprobs, strict=True)
                ],
                "refusal": None,
            }
        if body.return_token_ids:
            choice["token_ids"] = c.token_ids
        return choice

    # ---- POST /v1/completions ----------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request) -> dict[str, Any]:
        self.check_model(body.model)
        if body.stream:
            raise APIError(400, "streaming is not supported by this server; send stream=false")
        policy = self.policy
        if not isinstance(policy, TokenPolicy):
            raise APIError(501, "this policy does not take raw prompts; use /v1/chat/completions", "not_implemented")
        tok = policy.chat.tokenizer
        prompts = prompt_id_lists(body.prompt, tok, bool(body.add_special_tokens))
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        sampling = SamplingParams(
            temperature=sampling_temperature(body.temperature),
            top_p=sampling_top_p(body.top_p),
            max_tokens=max_tokens,
            stop=stop_strings(body.stop),
        )
        want_prompt_lp = (bool(body.echo) and body.logprobs is not None) or body.prompt_logprobs is not None
        request_id = f"cmpl-{uuid.uuid4().hex}"
        started = time.time()
        work = asyncio.gather(*(_one_prompt(policy, ids, sampling, body.n, want_prompt_lp) for ids in prompts))
        results = await self.unless_disconnected(request, work)
        choices: list[dict[str, Any]] = []
        extra_choices: list[dict[str, Any]] = []
        n_completion = 0
        for p, (ids, (prompt_lp, score_version, outs)) in enumerate(zip(prompts, results, strict=True)):
            prompt_text = tok.decode(ids)
            for j, c in enumerate(outs):
                index = p * body.n + j
                n_completion += len(c.token_ids or [])
                choices.append(self._text_choice(body, index, ids, prompt_text, prompt_lp, c, tok))
                extra_choices.append(_text_extra(index, ids, prompt_lp, score_version, c))
        n_prompt = sum(len(ids) for ids in prompts)
        version = extra_choices[0]["policy_version"] if extra_choices else self.current_version()
        return {
            **self._answer_head(request_id, "text_completion", started, version),
            "choices": choices,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_completion,
                "total_tokens": n_prompt + n_completion,
            },
            "safactory": {"policy_version": version, "choices": extra_choices},
        }

    def _text_choice(
        self,
        body: CompletionRequest,
        index: int,
        ids: list[int],
        prompt_text: str,
        prompt_lp: list[float | None] | None,
        c: Completion,
        tok: TinyTokenizer,
    ) -> dict[str, Any]:
        """One OpenAI text completion choice (with the prompt in front under `echo`), plus vLLM's extras if asked."""
        out_ids = c.token_ids or []
        text = (prompt_text if body.echo else "") + c.text
        choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None, "finish_reason": c.finish_reason}
        if body.logprobs is not None:
            as_ids = bool(body.return_tokens_as_token_ids)
            shown_ids = (ids if body.echo else []) + out_ids
            shown_lp: list[float | None] = (list(prompt_lp or []) if body.echo else []) + list(c.logprobs or [])
            choice["logprobs"] = completion_logprobs(
                [self.token_str(t, as_ids) for t in shown_ids],
                shown_lp,
                [tok.decode([t]) for t in shown_ids],
                bool(body.logprobs),
            )
        if body.prompt_logprobs is not None and prompt_lp is not None:
            choice["prompt_logprobs"] = [
                vllm_prompt_logprob(t, lp, self.token_str(t, False)) for t, lp in zip(ids, prompt_lp, strict=True)
            ]
        if body.return_token_ids:
            choice["prompt_token_ids"] = ids
            choice["token_ids"] = out_ids
        return choice

    # ---- POST /v1/load_weights ---------------------------------------------------------
    async def load_weights(self, body: LoadWeightsRequest) -> dict[str, Any]:
        policy = self.policy
        if not isinstance(policy, LocalPolicy):
            raise APIError(501, "this policy cannot load weights", "not_implemented")
        timeout_s = self.load_timeout_s
        shown = repr(shorten(body.path))  # the path as messages and the log quote it: bounded
        async with self.load_lock:
            previous = policy.version
            keeps = f"version {previous} keeps serving"
            if body.version is not None and body.version <= previous:
                raise APIError(
                    409, f"version {body.version} does not go up from the serving version {previous}", "conflict"
                )
            problem = _not_a_model_directory(body.path)
            if problem:
                raise APIError(400, f"could not load a model from {shown}: {problem}; {keeps}")
            try:
                loaded = await asyncio.wait_for(asyncio.to_thread(load_policy_model, body.path), timeout_s)
            except TimeoutError:
                raise APIError(504, f"loading {shown} took over {timeout_s} s; {keeps}") from None
            except Exception as exc:
                raise APIError(400, f"could not load a model from {shown}: {shorten(str(exc), 500)}; {keeps}") from None
            if tokenizer_fingerprint(loaded.chat.tokenizer) != tokenizer_fingerprint(policy.chat.tokenizer):
                raise APIError(400, f"{shown} uses another tokenizer; {keeps}")
            state = loaded.model.state_dict()
            problem = _state_mismatch(policy.model.state_dict(), state)
            if problem:
                raise APIError(400, f"{shown} does not fit the served model: {problem}; {keeps}")
            try:
                version = await policy.publish(state, body.version)
            except Exception as exc:
                raise APIError(500, f"swapping in the weights failed: {exc!r}", "server_error") from None
        log.info("loaded %s as policy version %d (was %d)", shown, version, previous)
        return {"object": "load_weights", "policy_version": version, "previous_version": previous, "path": body.path}


def _not_a_model_directory(path: str) -> str:
    """Why `path` is not a local model directory ("" when it is one): never a hub id to download,
    and a path the OS refuses (too long, a NUL byte) is the client's mistake, not the server's."""
    if "\x00" in path:
        return "the path holds a NUL character"
    directory = Path(path)
    try:
        if not directory.is_dir():
            return "not a directory"
        if not any((directory / name).is_file() for name in ("config.json", ADAPTER_CONFIG)):
            return f"not a model directory (it has no config.json or {ADAPTER_CONFIG})"
    except OSError as exc:  # e.g. a name too long for the file system, or a directory it may not read
        return f"the path cannot be used ({exc.strerror or type(exc).__name__})"
    return ""


async def _one_prompt(
    policy: TokenPolicy, ids: list[int], sampling: SamplingParams, n: int, want_prompt_lp: bool
) -> tuple[list[float | None] | None, int | None, list[Completion]]:
    """`n` continuations of one prompt, and (when asked) its log-probs with the version that scored them."""
    scored: tuple[list[float | None], int] | None = None
    if want_prompt_lp:
        scored = await policy.score_with_version(ids)
    outs = await asyncio.gather(*(policy.generate_ids(ids, sampling) for _ in range(n)))
    return (scored[0] if scored else None), (scored[1] if scored else None), list(outs)


def _text_extra(
    index: int, ids: list[int], prompt_lp: list[float | None] | None, score_version: int | None, c: Completion
) -> dict[str, Any]:
    """The `safactory` extra of one text completion choice: exact token ids, log-probs and versions."""
    extra: dict[str, Any] = {
        "index": index,
        "prompt_token_ids": ids,
        "token_ids": c.token_ids or [],
        "logprobs": list(c.logprobs or []),
        "policy_version": c.policy_version,
        "policy_versions": c.policy_versions or [c.policy_version],
        "finish_reason": c.finish_reason,
    }
    if prompt_lp is not None:
        extra["prompt_logprobs"] = prompt_lp
        extra["prompt_logprobs_version"] = score_version
    return extra


def _state_mismatch(current: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> str:
    """Why a loaded state dict does not fit the served model ("" when it does)."""
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
