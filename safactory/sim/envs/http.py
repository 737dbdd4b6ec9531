"""The env server's client: `HttpEnv`, an Environment whose episodes run on an env server, and its task source.

`HttpEnv(url)` speaks the protocol of `safactory.sim.wire` over `httpx.AsyncClient`. Only
session creation is retried (bounded, with exponential backoff, on connection errors); a
step is never retried because it is not idempotent. `close` deletes every session the
client asked for, also one whose creation it gave up on, and finishes in the background
when it is itself cancelled. Every failure is a `RemoteEnvError` with a clear message
(timeouts are also `TimeoutError`s), so the agent loop records `env_error` / `env_timeout`
and the run goes on. `register(registry)` adds the `http` and `https` schemes, so env ids
such as `http://127.0.0.1:8790` resolve to an EnvEntry whose tasks come from the server's
`/tasks`. The client token comes from `register(..., token=)` or the `SAFACTORY_ENV_TOKEN`
environment variable.

httpx is imported lazily, so importing this module (and registering the schemes) costs
nothing until a client is actually used. Plain HTTP does not protect the token on the
wire: outside one machine, use an `https://` id or a private network.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from safactory.sim.env import EnvEntry, EnvRegistry, EnvSpec
from safactory.sim.wire import (
    MAX_MESSAGE,
    TOKEN_ENV,
    RemoteEnvAuthError,
    RemoteEnvError,
    RemoteEnvTimeout,
    RemoteEnvUnavailable,
    ResetRequest,
    SessionInfo,
    SessionLimitError,
    StepRequest,
    TaskList,
    normalize_url,
    spec_from_json,
)
from safactory.types import Message, Observation, StepResult, Task

if TYPE_CHECKING:
    import httpx

_MAX_BACKOFF_S = 5.0
_T = TypeVar("_T")
_UNKNOWN_SPEC = EnvSpec(id="?", version="?")


def _backoff(base_s: float, attempt: int) -> float:
    return min(base_s * 2**attempt, _MAX_BACKOFF_S)


def _error(cls: type[RemoteEnvError], message: str, status: int | None = None) -> RemoteEnvError:
    error = cls(message)
    error.status = status
    return error


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:MAX_MESSAGE] or response.reason_phrase
    if isinstance(body, dict):
        if "message" in body:
            return str(body["message"])[:MAX_MESSAGE]
        if "detail" in body:  # FastAPI's request validation errors
            return json.dumps(body["detail"])[:MAX_MESSAGE]
    return json.dumps(body)[:MAX_MESSAGE]


def _answer(response: httpx.Response, what: str, url: str) -> Any:
    """The JSON body of a successful answer; a RemoteEnvError subclass that says why otherwise."""
    if response.is_success:
        try:
            return response.json()
        except ValueError as exc:
            raise RemoteEnvError(f"{what}: env server at {url} sent a body that is not JSON") from exc
    status = response.status_code
    message = _error_message(response)
    if status == 401:
        text = (
            f"{what}: env server at {url} refused the request (HTTP 401: {message}); "
            f"give the server's token (token=... or ${TOKEN_ENV})"
        )
        raise _error(RemoteEnvAuthError, text, status)
    if status == 429:
        raise _error(SessionLimitError, f"{what}: env server at {url} is full (HTTP 429): {message}", status)
    if status == 504:
        raise _error(RemoteEnvTimeout, f"{what}: env server at {url} timed out the environment: {message}", status)
    raise _error(RemoteEnvError, f"{what} failed on env server at {url} (HTTP {status}): {message}", status)


def _parse(validate: Callable[[Any], _T], data: Any, what: str, url: str) -> _T:
    try:
        return validate(data)
    except ValidationError as exc:
        raise RemoteEnvError(f"{what}: env server at {url} sent a malformed answer: {exc}") from exc


def _headers(token: str | None) -> dict[str, str]:
    token = token.strip() if token else None  # spaces at either end cannot cross HTTP; the server strips them too
    return {"Authorization": f"Bearer {token}"} if token else {}


def _unreachable(url: str, what: str, attempts: int, exc: Exception) -> RemoteEnvError:
    reason = str(exc) or type(exc).__name__
    return _error(
        RemoteEnvUnavailable,
        f"{what}: cannot reach env server at {url} after {attempts} attempt(s) ({reason}); "
        "is `safactory serve-env` running there?",
    )


def _get_json(
    url: str,
    path: str,
    what: str,
    *,
    params: dict[str, Any] | None = None,
    token: str | None = None,
    timeout_s: float = 60.0,
    connect_retries: int = 3,
    backoff_s: float = 0.25,
) -> Any:
    """A blocking GET, retried with backoff on connection errors only, at most `connect_retries` times."""
    import httpx

    attempts = connect_retries + 1
    with httpx.Client(base_url=url, headers=_headers(token), timeout=timeout_s) as client:
        for attempt in range(attempts):
            try:
                response = client.get(path, params=params)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt + 1 == attempts:
                    raise _unreachable(url, what, attempts, exc) from exc
                time.sleep(_backoff(backoff_s, attempt))
            except httpx.TimeoutException as exc:
                raise RemoteEnvTimeout(f"{what}: env server at {url} did not answer within {timeout_s:g}s") from exc
            except httpx.HTTPError as exc:
                raise RemoteEnvUnavailable(f"{what}: connection to env server at {url} failed ({exc!r})") from exc
    return _answer(response, what, url)


def fetch_spec(
    url: str, *, token: str | None = None, timeout_s: float = 60.0, connect_retries: int = 3, backoff_s: float = 0.25
) -> EnvSpec:
    """The EnvSpec served at `url` (blocking; bounded retries when the server is not up yet)."""
    url = normalize_url(url)
    what = "fetching the spec"
    data = _get_json(
        url, "/spec", what, token=token, timeout_s=timeout_s, connect_retries=connect_retries, backoff_s=backoff_s
    )
    return _parse(spec_from_json, data, what, url)


@dataclass
class HttpTaskSource:
    """A TaskSource drawing from the server's task source (GET /tasks), built there with `options`."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)
    token: str | None = None
    timeout_s: float = 60.0
    connect_retries: int = 3
    backoff_s: float = 0.25

    def tasks(self, split: str, n: int) -> list[Task]:
        url = normalize_url(self.url)
        params: dict[str, Any] = {"split": split, "n": n}
        if self.options:
            params["options"] = json.dumps(self.options)
        data = _get_json(
            url,
            "/tasks",
            "fetching tasks",
            params=params,
            token=self.token,
            timeout_s=self.timeout_s,
            connect_retries=self.connect_retries,
            backoff_s=self.backoff_s,
        )
        return _parse(TaskList.model_validate, data, "fetching tasks", url).tasks


class HttpEnv:
    """An Environment served by an env server: one instance, one session, one episode.

    `spec` is fetched from the server (blocking) unless given; inside an event loop pass
    it, or use `await HttpEnv.connect(url)`. The session is created on the first
    `reset`, with bounded retries on connection errors; `close` deletes it. Steps are
    never retried. `transport` replaces httpx's network transport (e.g. an in-process
    `httpx.ASGITransport`).
    """

    def __init__(
        self,
        url: str,
        *,
        spec: EnvSpec | None = None,
        token: str | None = None,
        timeout_s: float = 60.0,
        connect_retries: int = 3,
        backoff_s: float = 0.25,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if connect_retries < 0:
            raise ValueError(f"connect_retries must be >= 0, not {connect_retries}")
        self.url = normalize_url(url)
        self.token = token
        self.timeout_s = timeout_s
        self.connect_retries = connect_retries
        self.backoff_s = backoff_s
        self._transport = transport
        if spec is None:
            spec = fetch_spec(
                self.url, token=token, timeout_s=timeout_s, connect_retries=connect_retries, backoff_s=backoff_s
            )
        self.spec: EnvSpec = spec
        self.session_id: str | None = None
        self._requested: list[str] = []  # session ids asked for, whether or not the server answered
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self._closing: asyncio.Future[None] | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = 60.0,
        connect_retries: int = 3,
        backoff_s: float = 0.25,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> HttpEnv:
        """Build a client and fetch its spec without blocking the event loop."""
        env = cls(
            url,
            spec=_UNKNOWN_SPEC,
            token=token,
            timeout_s=timeout_s,
            connect_retries=connect_retries,
            backoff_s=backoff_s,
            transport=transport,
        )
        what = "fetching the spec"
        env.spec = _parse(spec_from_json, await env._call_with_retries("GET", "/spec", what), what, env.url)
        return env

    def _http(self, closing: bool = False) -> httpx.AsyncClient:
        import httpx

        if self._closed or (self._closing is not None and not closing):
            raise RemoteEnvError(f"this HttpEnv for {self.url} is closed")
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.url, headers=_headers(self.token), timeout=self.timeout_s, transport=self._transport
            )
        return self._client

    async def _send(
        self, method: str, path: str, what: str, body: dict[str, Any] | None, attempts: int, *, open_ok: bool = False
    ) -> Any:
        """One request; retried (up to `attempts` in all) only when the connection could not be made."""
        import httpx

        client = self._http(open_ok)
        for attempt in range(attempts):
            try:
                response = await client.request(method, path, json=body)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt + 1 == attempts:
                    raise _unreachable(self.url, what, attempts, exc) from exc
                await asyncio.sleep(_backoff(self.backoff_s, attempt))
            except httpx.TimeoutException as exc:
                text = f"{what}: env server at {self.url} did not answer within {self.timeout_s:g}s"
                raise _error(RemoteEnvTimeout, text) from exc
            except httpx.HTTPError as exc:
                text = f"{what}: connection to env server at {self.url} failed ({exc!r})"
                raise _error(RemoteEnvUnavailable, text) from exc
        return _answer(response, what, self.url)

    async def _call(self, method: str, path: str, what: str, body: dict[str, Any] | None = None) -> Any:
        return await self._send(method, path, what, body, attempts=1)

    async def _call_with_retries(self, method: str, path: str, what: str, body: dict[str, Any] | None = None) -> Any:
        return await self._send(method, path, what, body, attempts=self.connect_retries + 1)

    async def _open_session(self) -> str:
        what = "creating a session"
        # The client names the session, so `close` can delete it even when this call is
        # cancelled or times out after the server created it (servers that predate this
        # ignore the body and answer with an id of their own).
        import httpx

        requested = secrets.token_urlsafe(24)
        self._requested.append(requested)
        try:
            data = await self._call_with_retries("POST", "/sessions", what, {"session_id": requested})
        except RemoteEnvError as exc:
            refused = exc.status is not None  # the server answered: it created nothing
            if refused or isinstance(exc.__cause__, httpx.ConnectError | httpx.ConnectTimeout):
                self._requested.remove(requested)
            raise
        info = _parse(SessionInfo.model_validate, data, what, self.url)
        self.session_id = info.session_id
        served = _parse(spec_from_json, info.spec, what, self.url)
        if (served.id, served.version) != (self.spec.id, self.spec.version):
            raise RemoteEnvError(
                f"env server at {self.url} now serves {served.id}@{served.version}, "
                f"not {self.spec.id}@{self.spec.version} as when this client was set up"
            )
        return info.session_id

    async def reset(self, task: Task, seed: int) -> Observation:
        session_id = self.session_id or await self._open_session()
        body = ResetRequest(task=task, seed=seed).model_dump(mode="json")
        data = await self._call("POST", f"/sessions/{session_id}/reset", "reset", body)
        return _parse(Observation.model_validate, data, "reset", self.url)

    async def step(self, action: Message) -> StepResult:
        if self.session_id is None:
            raise RemoteEnvError("step() called before reset()")
        body = StepRequest(action=action).model_dump(mode="json")
        data = await self._call("POST", f"/sessions/{self.session_id}/step", "step", body)
        return _parse(StepResult.model_validate, data, "step", self.url)

    async def close(self) -> None:
        """Delete the session (one that already expired is fine) and close the connection pool.

        This also deletes a session whose creation was given up on (cancelled or timed out)
        and carries on in the background when `close` itself is cancelled, so that a
        session the server created never holds its slot until it idles out.
        """
        if self._closed:
            return
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._release())
            _RELEASING.add(self._closing)
            self._closing.add_done_callback(_RELEASING.discard)
        await asyncio.shield(self._closing)

    async def _release(self) -> None:
        ids = list(dict.fromkeys([*([self.session_id] if self.session_id else []), *self._requested]))
        self.session_id = None
        self._requested = []
        try:
            for session_id in ids:
                try:
                    await self._send("DELETE", f"/sessions/{session_id}", "closing the session", None, 1, open_ok=True)
                except RemoteEnvError as exc:
                    if exc.status != 404:
                        raise
        finally:
            self._closed = True
            if self._client is not None:
                await self._client.aclose()
                self._client = None


_RELEASING: set[asyncio.Future[None]] = set()  # closes that outlive a cancelled `close()` call


def register(
    registry: EnvRegistry,
    *,
    token: str | None = None,
    timeout_s: float = 60.0,
    connect_retries: int = 3,
    backoff_s: float = 0.25,
) -> None:
    """Resolve env ids `http://host:port` and `https://host:port` to env servers.

    Resolving an id fetches the server's spec (blocking, bounded retries, a clear error
    when the server is down). The token is `token`, else `$SAFACTORY_ENV_TOKEN` as read
    when the id is resolved. The entry's task factory takes the server task source's
    options as keyword arguments.
    """

    def scheme_factory(scheme: str) -> Callable[[str], EnvEntry]:
        def resolve(rest: str) -> EnvEntry:
            url = normalize_url(f"{scheme}:{rest}")
            key = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
            settings: dict[str, Any] = {
                "timeout_s": timeout_s,
                "connect_retries": connect_retries,
                "backoff_s": backoff_s,
            }
            spec = fetch_spec(url, token=key, **settings)

            def make_env() -> HttpEnv:
                return HttpEnv(url, spec=spec, token=key, **settings)

            def make_tasks(**options: Any) -> HttpTaskSource:
                return HttpTaskSource(url, options=options, token=key, **settings)

            return EnvEntry(factory=make_env, tasks=make_tasks, expert=None, spec=spec)

        return resolve

    for scheme in ("http", "https"):
        registry.register_scheme(scheme, scheme_factory(scheme))
