"""Loopback-only serving: which hosts are loopback, and a guard against DNS rebinding.

A server bound to 127.0.0.1 without a token is reachable from this machine only, but a
web page open in a local browser can still reach it through DNS rebinding: the page's
own host name is made to resolve to 127.0.0.1, and the browser then sends the page's
requests there, with the page's host name in the `Host` header. `LoopbackHostGuard`
answers every request whose `Host` is not a loopback name with 403, which stops that
(and nothing a local client does: they name 127.0.0.1, ::1 or localhost).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback_host(host: str) -> bool:
    """True for `localhost` (and names under it) and literal loopback addresses (127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host of a `Host` header value, without its port (`[::1]:80` -> `::1`)."""
    header = header.strip()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class LoopbackHostGuard:
    """ASGI middleware: 403 for any HTTP request whose `Host` header is not a loopback name."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), None)
            if host is not None and not is_loopback_host(host_name(host)):
                await _forbidden(send, host)
                return
        await self.app(scope, receive, send)


async def _forbidden(send: Send, host: str) -> None:
    message = (
        f"this server only answers requests addressed to a loopback host, not {host[:100]!r}; "
        "serve it with a token to reach it under another name"
    )
    body = json.dumps({"error": "forbidden_host", "message": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body})
