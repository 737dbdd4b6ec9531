"""Who may read the view: loopback without a token, as the other servers; with a token, whoever has it.

A browser cannot send a bearer header when it follows a link, so besides `Authorization: Bearer T`
the view takes the token once in the query string (`/?token=T`): it answers with a redirect to the
same address without it and a cookie (HttpOnly, SameSite=Strict) that carries the token's sha256
from then on. Tokens are compared in constant time. Without a token the app is wrapped in
`safactory.loopback.LoopbackHostGuard` (`serve_view`), which refuses requests made through DNS
rebinding.
"""

from __future__ import annotations

import hashlib
import hmac
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

from safactory.loopback import ASGIApp, Receive, Scope, Send, is_loopback_host

COOKIE = "safactory_view_token"
QUERY = "token"


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond this machine without a token, and a blank token anywhere."""
    if token is not None and not token.strip():
        raise ValueError("the view's token must not be blank (check --token / $SAFACTORY_VIEW_TOKEN)")
    if not token and not is_loopback_host(host):
        raise ValueError(
            f"refusing to serve the view on non-loopback host {host!r} without a token: anyone who can reach it "
            "could read every stored trajectory. Pass --token (open the view once as http://HOST:PORT/?token=...) "
            "or bind to 127.0.0.1."
        )


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


def cookie_value(token: str) -> str:
    """What the cookie holds: the token's sha256 (hex, so any token fits a cookie)."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenGate:
    """ASGI middleware: a 401 unless the request carries the token (bearer header, cookie, or `?token=`)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and _same(given.strip(), self.token):
            await self.app(scope, receive, send)
            return
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed cookie header: as if none
            cookie = SimpleCookie()
        if COOKIE in cookie and _same(cookie[COOKIE].value, cookie_value(self.token)):
            await self.app(scope, receive, send)
            return
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        offered = [v for k, v in query if k == QUERY]
        if offered and _same(offered[-1], self.token):
            rest = urlencode([(k, v) for k, v in query if k != QUERY]).encode("ascii")
            path = scope.get("raw_path") or scope.get("path", "/").encode("utf-8")
            await _redirect_with_cookie(send, path + (b"?" + rest if rest else b""), self.token)
            return
        await _unauthorized(send)


async def _redirect_with_cookie(send: Send, location: bytes, token: str) -> None:
    cookie = f"{COOKIE}={cookie_value(token)}; HttpOnly; SameSite=Strict; Path=/"
    headers = [(b"location", location), (b"set-cookie", cookie.encode("latin-1"))]
    await send({"type": "http.response.start", "status": 303, "headers": [*headers, (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def _unauthorized(send: Send) -> None:
    body = (
        b"<!doctype html><title>safactory view: token needed</title><p>This view needs its token: open it once as "
        b"<code>http://HOST:PORT/?token=...</code> (or send <code>Authorization: Bearer ...</code>).</p>"
    )
    headers = [
        (b"content-type", b"text/html; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b"Bearer"),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})
