"""Bounds on what an HTTP client may send, shared by the env server and the policy server.

`RequestLimits` is ASGI middleware that answers a request the app must not see with a 4xx
before the app runs:

* a path and query string over `max_url_bytes`: 414;
* a body over `max_body_bytes` (by its Content-Length, or as it streams in): 413;
* a body that is not UTF-8 (both servers take JSON bodies only, and JSON is UTF-8): 400;
* JSON nested deeper than `max_json_depth` arrays and objects: 400 (deep enough input makes
  Python's parser and serialisers raise RecursionError, a server error);
* JSON holding a lone UTF-16 surrogate escape (`"\\ud800"` without its pair): 400 (a string
  that cannot be written back out as UTF-8 would break whatever echoes or stores it).

Each server passes `error_body(status, code, message)` to answer in its own error shape.
`parse_json_text` applies the same JSON checks to JSON carried elsewhere (a query parameter),
and `shorten` bounds client text before it is echoed in a message or written to a log.
"""

from __future__ import annotations

import asyncio
import json
import operator
import re
from collections.abc import Awaitable, Callable, MutableMapping
from itertools import accumulate, count
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
ErrorBody = Callable[[int, str, str], dict[str, Any]]

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_URL_BYTES = 8 * 1024
MAX_JSON_DEPTH = 64
SHOWN_CHARS = 200  # characters of client text quoted in a message or a log line
_CHECK_IN_THREAD_BYTES = 256 * 1024  # a larger body is checked off the event loop

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_OPEN_CLOSE = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")  # each bracket as (its depth change) + 1
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class JsonLimitError(ValueError):
    """JSON the servers refuse: nested too deeply or holding a lone surrogate (the message says which)."""


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` cut to `limit` characters (saying how long it was), with anything not UTF-8 escaped."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_depth(data: bytes) -> int:
    """How deeply arrays and objects nest in JSON text (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", data)).translate(_OPEN_CLOSE)
    # the running sum of (change + 1) minus the count of brackets so far is the depth after each one
    return max(map(operator.sub, accumulate(brackets), count(1)), default=0)


def check_json(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise JsonLimitError when `data` nests deeper than `max_depth` or holds a lone surrogate escape.

    Malformed JSON is not this check's business: the app's own parser answers it.
    """
    depth = json_depth(data)
    if depth > max_depth:
        raise JsonLimitError(f"JSON nested {depth} levels deep; at most {max_depth} levels are accepted")
    if not _SURROGATE_ESCAPE.search(data):
        return
    try:
        value = json.loads(data)
    except ValueError:
        return
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise JsonLimitError(
            "JSON holds a lone UTF-16 surrogate escape (such as \\ud800 without its pair); it is not text"
        ) from None


def parse_json_text(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON that came from a client; ValueError (with a clear message) for anything refused."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonLimitError("JSON holds a lone UTF-16 surrogate; it is not text") from None
    check_json(data, max_depth)
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at character {exc.pos}") from None
    except ValueError as exc:  # an integer over Python's digit limit
        raise ValueError(f"not valid JSON: {shorten(str(exc))}") from None


class RequestLimits:
    """ASGI middleware answering over-long URLs (414), over-large bodies (413) and bodies that are not
    UTF-8 or hold JSON past the limits (400) in the server's own error shape; the app gets the rest,
    its body replayed in one piece."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        error_body: ErrorBody,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_url_bytes: int = MAX_URL_BYTES,
        max_json_depth: int = MAX_JSON_DEPTH,
    ) -> None:
        for name, value in (("max_body_bytes", max_body_bytes), ("max_url_bytes", max_url_bytes)):
            if value < 1:
                raise ValueError(f"{name} must be positive, not {value}")
        if max_json_depth < 1:
            raise ValueError(f"max_json_depth must be positive, not {max_json_depth}")
        self.app = app
        self.error_body = error_body
        self.max_body_bytes = max_body_bytes
        self.max_url_bytes = max_url_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        url_bytes = len(scope.get("raw_path") or scope.get("path", "").encode()) + len(scope.get("query_string", b""))
        if url_bytes > self.max_url_bytes:
            message = f"the URL is {url_bytes} bytes long; this server takes at most {self.max_url_bytes}"
            await self._refuse(send, 414, "url_too_long", message)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send, 413, "body_too_large", self._too_large(f"{declared} bytes"))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse(send, 413, "body_too_large", self._too_large(f"over {self.max_body_bytes} bytes"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if len(body) > _CHECK_IN_THREAD_BYTES:
            problem = await asyncio.to_thread(self._body_problem, body)
        else:
            problem = self._body_problem(body)
        if problem:
            await self._refuse(send, 400, "bad_request", problem)
            return
        await self.app(scope, _replay(body, receive), send)

    def _too_large(self, size: str) -> str:
        return f"the request body is {size}; this server takes at most {self.max_body_bytes} bytes"

    def _body_problem(self, body: bytes) -> str:
        if not body:
            return ""
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"the request body is not UTF-8 (byte {exc.start} is invalid); send a JSON body in UTF-8"
        try:
            check_json(body, self.max_json_depth)
        except JsonLimitError as exc:
            return f"the request body is refused: {exc}"
        return ""

    async def _refuse(self, send: Send, status: int, code: str, message: str) -> None:
        payload = json.dumps(self.error_body(status, code, message)).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the buffered body once, then whatever the client sends next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
