"""The env server: a FastAPI app serving one registered environment over HTTP, and its session table.

`create_env_app(env_id, registry, ...)` builds the app (endpoints and bodies: `safactory.sim.wire`);
`serve_env(...)` runs it with uvicorn (`safactory serve-env`). Sessions are bounded
(429 when full), expire after `idle_timeout_s` without a call, and every env call is
bounded by `env_timeout_s` (504, and the session is dropped). Each session's environment
is built and runs on an event loop in a thread of its own, so a synchronous `reset`/`step`
stalls only its session and is still timed out (the call itself runs on in its thread
until it returns). A client that names its session can delete one whose creation it gave
up on: a DELETE that arrives while the session is being built closes it once built, and
one that arrives before the POST means the POST creates nothing (409). With a token
every endpoint needs `Authorization: Bearer <token>` (401 otherwise); `serve_env` refuses
to bind anything but a loopback host without one (`check_bind`). Every error answer has the
JSON body `{"error": ..., "message": ...}`. A failure inside the environment is an HTTP 500;
what a client got wrong is a 4xx and never reaches it as a failure: a URL, body or JSON past
the limits or a body that is not UTF-8 (413 / 414 / 400, `safactory.request_limits`), a body
that does not validate (422), `options` of /tasks that are not a small JSON object (400), a
task that `reset` refuses with TypeError, ValueError or KeyError (400, `bad_task`), a step
before the session's first successful reset (409, `reset_required`; resetting again starts
the episode over), an unknown session (404).

FastAPI and uvicorn are imported lazily, so importing this module costs nothing until a
server is built. Plain HTTP does not protect the token on the wire: outside one machine,
put the server behind TLS or a private network.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from safactory.loopback import LoopbackHostGuard, is_loopback_host
from safactory.request_limits import MAX_BODY_BYTES, RequestLimits, parse_json_text, shorten
from safactory.sim.env import EnvEntry, Environment, EnvRegistry, EnvSpec
from safactory.sim.wire import (
    CLIENT_SESSION_ID,
    DEFAULT_PORT,
    MAX_MESSAGE,
    CreateSessionRequest,
    ResetRequest,
    SessionInfo,
    StepRequest,
    TaskList,
    UnsafeBindError,
    spec_to_json,
)
from safactory.types import Observation, StepResult

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 10.0
_TASK_REFUSALS: tuple[type[Exception], ...] = (TypeError, ValueError, KeyError)  # reset refusing the client's task
_MAX_FORGOTTEN = 10_000
_T = TypeVar("_T")


def check_bind(host: str, token: str | None) -> None:
    """Raise UnsafeBindError when `host` is reachable from other machines and no token guards it."""
    if token is not None and not token.strip():
        raise ValueError("the env server token must not be empty")
    if token is None and not is_loopback_host(host):
        raise UnsafeBindError(
            f"refusing to serve an environment on non-loopback host {host!r} without a token: anyone who can "
            "reach it could drive the environment. Pass --token (clients use SAFACTORY_ENV_TOKEN) "
            "or bind 127.0.0.1."
        )


class _ApiError(Exception):
    """An error answer: HTTP status, a short code and a message, sent as JSON."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = shorten(message, MAX_MESSAGE)


class _EnvLoop:
    """A thread running one event loop, where one session's environment is built and runs.

    Every session gets its own, so an environment that computes synchronously in
    `reset`/`step` (or its constructor) stalls only itself: the server's loop keeps
    answering other sessions and enforces `env_timeout_s` on it.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` (awaiting its result when it is awaitable) on this loop; cancelling the caller cancels it."""

        async def invoke() -> Any:
            result = fn()
            if inspect.isawaitable(result):
                result = await result
            return result

        coro = invoke()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is closed: its session is gone
            coro.close()
            raise
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        with suppress(RuntimeError):  # already stopped and closed
            self.loop.call_soon_threadsafe(self.loop.stop)


@dataclass
class _Session:
    id: str
    runner: _EnvLoop
    last_used: float
    env: Environment | None = None  # None while the environment is being built
    reset: bool = False  # whether its last reset succeeded: a step needs one
    busy: bool = False
    closing: bool = False


@dataclass
class _SessionTable:
    """Live sessions: bounded in number, expired when idle, one call at a time each.

    A session is listed (and busy) from the moment its creation starts, so a DELETE
    that arrives while its environment is still being built closes it as soon as it
    is; a DELETE of a client-chosen id that is not known yet is remembered, so a
    POST /sessions for that id arriving later creates nothing.
    """

    factory: Callable[[], Environment]
    max_sessions: int
    idle_timeout_s: float
    clock: Callable[[], float]
    sessions: dict[str, _Session] = field(default_factory=dict)
    forgotten: dict[str, None] = field(default_factory=dict)  # ids deleted before they were created
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    async def create(self, session_id: str | None = None) -> _Session:
        if session_id is None:
            session_id = secrets.token_urlsafe(16)
        elif session_id in self.sessions:
            raise _ApiError(409, "session_exists", f"session {session_id!r} already exists")
        elif session_id in self.forgotten:
            raise _ApiError(409, "session_closed", f"session {session_id!r} was closed before it was created")
        if len(self.sessions) >= self.max_sessions:
            raise _ApiError(
                429,
                "session_limit",
                f"session limit reached: {len(self.sessions)} of {self.max_sessions} sessions in use; close "
                "finished sessions, run fewer concurrent episodes or start the server with a larger --max-sessions",
            )
        session = _Session(
            id=session_id, runner=_EnvLoop(f"env-session-{session_id[:8]}"), last_used=self.clock(), busy=True
        )
        self.sessions[session_id] = session
        # Built in a task of its own: the session is registered (or closed) even when the request is cancelled.
        return await asyncio.shield(self._spawn(self._build(session)))

    async def _build(self, session: _Session) -> _Session:
        try:
            session.env = await session.runner.call(self.factory)
        except BaseException as exc:
            self.sessions.pop(session.id, None)
            session.runner.stop()
            if not isinstance(exc, Exception):
                raise
            logger.exception("creating an environment failed")
            raise _ApiError(500, "env_error", f"creating the environment raised {_describe(exc)}") from exc
        session.busy = False
        session.last_used = self.clock()
        if session.closing:
            await self.remove(session.id)
            raise _ApiError(409, "session_closed", f"session {session.id!r} was closed while it was being created")
        return session

    def _spawn(self, call: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """A task the table keeps until it ends (its failure is logged by whoever awaits it, or dropped)."""
        task = asyncio.ensure_future(call)
        self.background.add(task)

        def done(finished: asyncio.Task[Any]) -> None:
            self.background.discard(finished)
            if not finished.cancelled():
                finished.exception()  # retrieved: a request that went away must not leave a warning

        task.add_done_callback(done)
        return task

    def get(self, session_id: str) -> _Session:
        session = self.sessions.get(session_id)
        if session is None or session.closing:
            raise _ApiError(
                404,
                "unknown_session",
                f"no session {session_id!r}: it was closed, expired after "
                f"{self.idle_timeout_s:g}s idle, or never existed",
            )
        return session

    @asynccontextmanager
    async def use(self, session_id: str) -> AsyncIterator[_Session]:
        """Hold a session for one call; a session closed meanwhile is closed when the call ends."""
        session = self.get(session_id)
        if session.busy:
            raise _ApiError(409, "session_busy", f"session {session_id!r} is already handling a call")
        session.busy = True
        try:
            yield session
        finally:
            session.busy = False
            session.last_used = self.clock()
            if session.closing:
                await self.remove(session.id)

    async def remove(self, session_id: str, *, wait: bool = True) -> bool:
        """Close a session now, or as soon as its running call ends. False when it does not exist.

        With `wait=False` the environment is closed in the background (after a timed-out call,
        whose environment may still be busy in its thread).
        """
        session = self.sessions.get(session_id)
        if session is None:
            if CLIENT_SESSION_ID.fullmatch(session_id):
                self.forgotten[session_id] = None
                while len(self.forgotten) > _MAX_FORGOTTEN:
                    del self.forgotten[next(iter(self.forgotten))]
            return False
        if session.busy and wait:
            session.closing = True
            return True
        del self.sessions[session_id]
        closing = self._spawn(_close_session(session))
        if wait:
            await asyncio.shield(closing)
        return True

    async def expire_idle(self) -> int:
        now = self.clock()
        stale = [s.id for s in self.sessions.values() if not s.busy and now - s.last_used > self.idle_timeout_s]
        for session_id in stale:
            logger.info("session %s expired after %.0fs idle", session_id, self.idle_timeout_s)
            await self.remove(session_id)
        return len(stale)

    async def close_all(self) -> None:
        for session in list(self.sessions.values()):
            if session.env is None:  # still being built: closed as soon as it is
                session.closing = True
            else:
                session.busy = False
                await self.remove(session.id)
        if self.background:
            await asyncio.wait(self.background, timeout=_CLOSE_TIMEOUT_S)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _close_quietly(env: Environment, timeout_s: float = _CLOSE_TIMEOUT_S) -> None:
    try:
        await asyncio.wait_for(env.close(), timeout_s)
    except Exception:  # a failed close must not take the server or other sessions with it
        logger.exception("closing an environment failed")


async def _close_session(session: _Session, timeout_s: float = _CLOSE_TIMEOUT_S) -> None:
    """Close a session's environment in its own thread (bounded), then end that thread."""
    try:
        env = session.env
        if env is not None:
            await asyncio.wait_for(session.runner.call(env.close), timeout_s)
    except Exception:  # a failed close must not take the server or other sessions with it
        logger.exception("closing an environment failed")
    finally:
        session.runner.stop()


async def _bounded(
    session: _Session,
    call: Callable[[], Any],
    what: str,
    timeout_s: float | None,
    refusals: tuple[type[Exception], ...] = (),
) -> Any:
    """Run an env call in the session's thread under the server's time limit; an env failure becomes an
    HTTP 500, an exception of the `refusals` classes a 400 (the environment refused the client's input)."""
    try:
        async with asyncio.timeout(timeout_s) as scope:
            return await session.runner.call(call)
    except TimeoutError as exc:
        if scope.expired():
            raise _ApiError(504, "env_timeout", f"{what} did not finish within {timeout_s:g}s") from exc
        logger.exception("environment %s failed", what)
        raise _ApiError(500, "env_error", f"{what} raised {_describe(exc)}") from exc
    except refusals as exc:
        raise _ApiError(400, "bad_task", f"the environment refused the {what}: {_describe(exc)}") from exc
    except Exception as exc:
        logger.exception("environment %s failed", what)
        raise _ApiError(500, "env_error", f"{what} raised {_describe(exc)}") from exc


def _json_response(model_cls: type[BaseModel], value: Any, what: str) -> Any:
    from fastapi.responses import JSONResponse

    try:
        record = value if isinstance(value, model_cls) else model_cls.model_validate(value)
        return JSONResponse(record.model_dump(mode="json"))
    except Exception as exc:  # a result that is not a valid record or not JSON (NaN, numpy values, ...)
        logger.exception("environment %s returned an unsendable result", what)
        raise _ApiError(500, "env_error", f"{what} returned a result that cannot be sent: {_describe(exc)}") from exc


def _spec_of(entry: EnvEntry) -> tuple[EnvSpec, Environment | None]:
    """The entry's spec, instantiating one environment (returned, to be closed) when the entry has none."""
    if entry.spec is not None:
        return entry.spec, None
    probe = entry.factory()
    return probe.spec, probe


def create_env_app(
    env_id: str,
    registry: EnvRegistry | None = None,
    *,
    max_sessions: int = 64,
    token: str | None = None,
    idle_timeout_s: float = 600.0,
    env_timeout_s: float | None = 60.0,
    max_tasks: int = 100_000,
    max_body_bytes: int = MAX_BODY_BYTES,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """A FastAPI app serving environment `env_id` from `registry` (default: the default registry)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    if max_sessions < 1:
        raise ValueError(f"max_sessions must be at least 1, not {max_sessions}")
    if idle_timeout_s <= 0:
        raise ValueError(f"idle_timeout_s must be positive, not {idle_timeout_s}")
    if token is not None and not token.strip():
        raise ValueError("the env server token must not be empty")
    if token is not None:
        token = token.strip()  # what clients send is compared stripped, as HTTP drops the spaces anyway
    if registry is None:
        from safactory.sim.registry import default_registry

        registry = default_registry()
    entry = registry.get(env_id)
    spec, probe = _spec_of(entry)
    spec_json = spec_to_json(spec)
    table = _SessionTable(entry.factory, max_sessions, idle_timeout_s, clock)
    reap_every_s = min(max(idle_timeout_s / 4, 0.05), 30.0)

    async def reaper() -> None:
        while True:
            await asyncio.sleep(reap_every_s)
            try:
                await table.expire_idle()
            except Exception:  # the reaper must outlive any one bad close
                logger.exception("expiring idle sessions failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if probe is not None:
            await _close_quietly(probe)
        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            await table.close_all()

    app = FastAPI(title=f"safactory env server: {spec.id}@{spec.version}", lifespan=lifespan)

    @app.exception_handler(_ApiError)
    async def api_error(request: Request, exc: _ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the problems' places and kinds only: echoing the input could be large, or bytes that are not text
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())) or 'request'}: {e.get('msg')}" for e in exc.errors()[:5]
        )
        return JSONResponse(
            {"error": "bad_request", "message": shorten(f"invalid request: {problems}", MAX_MESSAGE)}, status_code=422
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        body = {"error": code, "message": shorten(str(exc.detail), MAX_MESSAGE)}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    # added before `authenticate`, so it runs after it: a request without the token is refused unread
    app.add_middleware(
        RequestLimits,
        error_body=lambda status, code, message: {"error": code, "message": message},
        max_body_bytes=max_body_bytes,
    )

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Callable[[Request], Any]) -> Any:
        if token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                reason = "missing" if not given else "invalid"
                return JSONResponse(
                    {"error": "unauthorized", "message": f"{reason} bearer token; this env server requires one"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        await table.expire_idle()
        return {
            "ok": True,
            "env_id": spec.id,
            "env_version": spec.version,
            "active_sessions": len(table.sessions),
            "max_sessions": max_sessions,
        }

    @app.get("/spec")
    async def get_spec() -> dict[str, Any]:
        return spec_json

    @app.get("/tasks")
    async def get_tasks(
        split: str = Query("train"), n: int = Query(10, ge=0, le=max_tasks), options: str = Query("{}")
    ) -> dict[str, Any]:
        try:
            kwargs = parse_json_text(options)
        except ValueError as exc:
            raise _ApiError(400, "bad_request", f"options must be a JSON object: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise _ApiError(400, "bad_request", "options must be a JSON object")
        try:
            tasks = await asyncio.to_thread(lambda: entry.tasks(**kwargs).tasks(split, n))
        except (TypeError, ValueError, KeyError) as exc:
            raise _ApiError(400, "bad_request", f"cannot draw {n} {shorten(split)!r} tasks: {_describe(exc)}") from exc
        return TaskList(tasks=tasks).model_dump(mode="json")

    @app.post("/sessions")
    async def create_session(body: CreateSessionRequest | None = None) -> dict[str, Any]:
        await table.expire_idle()
        session = await table.create(body.session_id if body is not None else None)
        assert session.env is not None
        return SessionInfo(
            session_id=session.id, spec=spec_to_json(session.env.spec), idle_timeout_s=idle_timeout_s
        ).model_dump(mode="json")

    @app.post("/sessions/{session_id}/reset")
    async def reset(session_id: str, body: ResetRequest) -> Any:
        try:
            async with table.use(session_id) as session:
                env = session.env
                session.reset = False
                obs = await _bounded(
                    session, lambda: env.reset(body.task, body.seed), "reset", env_timeout_s, _TASK_REFUSALS
                )
                response = _json_response(Observation, obs, "reset")
                session.reset = True
                return response
        except _ApiError as exc:
            if exc.code == "env_timeout":  # the env's state is unknown after a cancelled call: drop it
                await table.remove(session_id, wait=False)
            raise

    @app.post("/sessions/{session_id}/step")
    async def step(session_id: str, body: StepRequest) -> Any:
        try:
            async with table.use(session_id) as session:
                if not session.reset:
                    raise _ApiError(
                        409,
                        "reset_required",
                        f"session {shorten(session_id)!r} has no episode to step: POST /sessions/{{id}}/reset first"
                        " (a step before the first reset, or after a reset that failed)",
                    )
                env = session.env
                result = await _bounded(session, lambda: env.step(body.action), "step", env_timeout_s)
                return _json_response(StepResult, result, "step")
        except _ApiError as exc:
            if exc.code == "env_timeout":  # the env's state is unknown after a cancelled call: drop it
                await table.remove(session_id, wait=False)
            raise

    @app.delete("/sessions/{session_id}")
    async def delete_session(session_id: str) -> dict[str, Any]:
        if not await table.remove(session_id):
            raise _ApiError(404, "unknown_session", f"no session {session_id!r}")
        return {"closed": True}

    return app


def serve_env(
    env_id: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_sessions: int = 64,
    token: str | None = None,
) -> None:
    """Serve environment `env_id` over HTTP until interrupted (blocks).

    Raises UnsafeBindError before anything starts when `host` is not a loopback
    address and no token is given.
    """
    check_bind(host, token)
    import uvicorn

    app: Any = create_env_app(env_id, max_sessions=max_sessions, token=token)
    if token is None:  # loopback only: refuse requests that a web page made through DNS rebinding
        app = LoopbackHostGuard(app)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info")
