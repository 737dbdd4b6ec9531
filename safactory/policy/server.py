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
  is a clear 4xx error and the old version keeps serving; messages and the log quote the path cut short.

Errors come back in OpenAI's shape (`{"error": {"message", "type", ...}}`): a bad request is a 400
(also a body that is not UTF-8 or JSON nested past the limit; an over-large body is a 413, an
over-long URL a 414: `safactory.request_limits`),
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

The wire format (request bodies, error shapes, message conversion) is in
`safactory.policy.openai_wire`, the endpoints' logic in `safactory.policy.openai_service`, the
recorder in `safactory.policy.recorder`; this file builds the app and serves it.

Not implemented: streaming (`stream: true` is a 400), real top-k alternatives (`top_logprobs`
lists only the sampled token), `seed` (the policy's own generator decides), and `logit_bias`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from safactory.loopback import LoopbackHostGuard, is_loopback_host
from safactory.policy.base import Policy, PolicyError
from safactory.policy.local import LocalPolicy
from safactory.policy.models import load_policy_model
from safactory.policy.openai_service import PolicyService
from safactory.policy.openai_wire import APIError, error_kind, error_response
from safactory.policy.recorder import ProxyRecorder
from safactory.policy.specs import placement
from safactory.request_limits import MAX_BODY_BYTES, RequestLimits


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
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """An OpenAI-compatible FastAPI app around `policy` (see the module docstring).

    A generating request checks every `disconnect_poll_s` seconds whether its client is still
    there; once it is gone, the generation is cancelled and the policy drops its rows.
    """
    service = PolicyService(
        policy,
        model_name=model_name,
        token=token,
        recorder=recorder,
        default_max_tokens=default_max_tokens,
        load_timeout_s=load_timeout_s,
        disconnect_poll_s=disconnect_poll_s,
    )
    app = FastAPI(title="safactory policy server", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.dependencies.append(Depends(service.check_token))
    _add_error_handlers(app)
    app.add_middleware(
        RequestLimits,
        error_body=lambda status, code, message: {
            "error": {"message": message, "type": error_kind(status), "param": None, "code": status}
        },
        max_body_bytes=max_body_bytes,
    )
    app.get("/v1/models")(service.list_models)
    app.post("/v1/chat/completions")(service.chat_completions)
    app.post("/v1/completions")(service.completions)
    app.post("/v1/load_weights")(service.load_weights)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape, with the status that tells a client whether to retry."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in exc.errors()[:5]
        )
        return error_response(400, f"invalid request: {problems}", "invalid_request_error")

    @app.exception_handler(PolicyError)
    async def _policy_error(_request: Request, exc: PolicyError) -> JSONResponse:
        status = int(getattr(exc, "status_code", 400))
        return error_response(status, str(exc), "policy_error" if status < 500 else "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = error_response(exc.status_code, str(exc.detail), error_kind(exc.status_code))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
        # the server re-raises it after this answer, so its traceback is logged there
        return error_response(500, f"internal server error: {exc!r}", "server_error")


def create_proxy_app(
    upstream_policy: Policy,
    recorder: ProxyRecorder,
    *,
    model_name: str = "proxy",
    token: str | None = None,
) -> FastAPI:
    """A recording pass-through: `create_policy_app` with a recorder around any Policy."""
    return create_policy_app(upstream_policy, model_name=model_name, token=token, recorder=recorder)


# ---- binding and serving -----------------------------------------------------------------
def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token, and a blank token anywhere."""
    if token and not token.strip():
        raise ValueError("the policy server token must not be blank (check --token / $SAFACTORY_POLICY_TOKEN)")
    if not is_loopback_host(host) and not token:
        raise ValueError(
            f"refusing to serve the policy on non-loopback host {host!r} without a token: "
            "anyone who can reach it could sample from the model and load weights from any path. "
            "Pass a token (clients send it as `Authorization: Bearer <token>`) or bind to 127.0.0.1."
        )


def load_served_policy(model_dir: str | Path, *, device: str = "cpu", dtype: str = "auto") -> LocalPolicy:
    """The policy `serve-policy` serves: the model (`tiny`, `smollm2` or a saved directory) loaded in `dtype`
    and moved to `device` (see `safactory.policy.specs.placement`; a bad name is a ValueError)."""
    where, torch_dtype = placement(device, dtype)
    loaded = load_policy_model(str(model_dir), dtype=torch_dtype)
    return LocalPolicy(loaded.model.to(where), loaded.chat)


def serve_policy(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
) -> None:
    """Load a model (`tiny`, `smollm2` or a saved directory), wrap it in a LocalPolicy and serve it."""
    check_bind(host, token)
    policy = load_served_policy(model_dir, device=device, dtype=dtype)
    app: Any = create_policy_app(policy, model_name=model_name or Path(model_dir).resolve().name, token=token)
    if not token:  # loopback only: refuse requests that a web page made through DNS rebinding
        app = LoopbackHostGuard(app)
    # no access log: it would write every request's whole URL, however long, into the log
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)


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
    "BackgroundServer",
    "check_bind",
    "create_policy_app",
    "create_proxy_app",
    "load_served_policy",
    "serve_policy",
]
