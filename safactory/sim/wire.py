"""The env server's wire format: endpoints, request and answer bodies, the errors both sides name.

An env server (`safactory.sim.serve`) serves one registered environment over HTTP and
its client (`safactory.sim.envs.http`) is itself an Environment. One session is one
episode and owns one environment instance:

    POST   /sessions                 {session_id}? -> {session_id, spec, idle_timeout_s}
    POST   /sessions/{id}/reset      {task, seed}       -> Observation
    POST   /sessions/{id}/step       {action: Message}  -> StepResult
    DELETE /sessions/{id}            close the environment
    GET    /health                   {ok, env_id, env_version, active_sessions, max_sessions}
    GET    /spec                     the EnvSpec
    GET    /tasks?split=&n=&options= tasks from the server's task source ({"tasks": [...]})

A client may name the session it asks for (`{"session_id": ...}`, 16 to 128 URL-safe
characters; otherwise the server picks one). With a token every endpoint needs
`Authorization: Bearer <token>`; clients read it from `$SAFACTORY_ENV_TOKEN` (TOKEN_ENV).
A failure is an HTTP error whose JSON body `{"error": ..., "message": ...}` names it;
the client turns it into one of the `RemoteEnvError` classes below.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field, TypeAdapter

from safactory.sim.env import EnvSpec
from safactory.types import Message, Task

TOKEN_ENV = "SAFACTORY_ENV_TOKEN"
DEFAULT_PORT = 8790
MAX_MESSAGE = 2000  # characters of an error message sent or shown
CLIENT_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")
_SPEC = TypeAdapter(EnvSpec)


# ---- errors ---------------------------------------------------------------------------------------


class RemoteEnvError(RuntimeError):
    """A remote environment call failed; the message says where and why.

    `status` is the HTTP status of the server's answer, None when there was none.
    """

    status: int | None = None


class RemoteEnvUnavailable(RemoteEnvError):
    """The env server could not be reached (down, wrong address, connection lost)."""


class RemoteEnvAuthError(RemoteEnvError):
    """The env server rejected the request's bearer token (missing or wrong)."""


class SessionLimitError(RemoteEnvError):
    """The env server already runs as many sessions as it allows."""


class RemoteEnvTimeout(RemoteEnvError, TimeoutError):
    """A remote environment call did not finish in time."""


class UnsafeBindError(ValueError):
    """Refused to serve on a non-loopback address without a token."""


# ---- wire format ----------------------------------------------------------------------------------


class ResetRequest(BaseModel):
    task: Task
    seed: int = 0


class CreateSessionRequest(BaseModel):
    """The optional body of POST /sessions: a client-chosen session id, so that the client can
    delete the session even when it gave up before the answer came."""

    session_id: str | None = Field(default=None, pattern=CLIENT_SESSION_ID.pattern)


class StepRequest(BaseModel):
    action: Message


class SessionInfo(BaseModel):
    """The server's answer to POST /sessions."""

    session_id: str
    spec: dict[str, Any]
    idle_timeout_s: float


class TaskList(BaseModel):
    tasks: list[Task] = Field(default_factory=list)


def spec_to_json(spec: EnvSpec) -> dict[str, Any]:
    """An EnvSpec as plain JSON (tools included). `reusable` stays home: it speaks of the server's own
    instances, and a client's session is one episode whatever they allow."""
    return _SPEC.dump_python(spec, mode="json", exclude={"reusable"})


def spec_from_json(data: Any) -> EnvSpec:
    """The inverse of `spec_to_json`; raises pydantic's ValidationError on a malformed spec."""
    return _SPEC.validate_python(data)


def normalize_url(url: str) -> str:
    """`http(s)://host:port[/prefix]` without a trailing slash; ValueError for anything else."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except Exception as exc:
        raise ValueError(f"not an env server URL: {url!r} ({exc})") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"not an env server URL: {url!r}; expected http://host:port or https://host:port")
    return str(parsed).rstrip("/")
