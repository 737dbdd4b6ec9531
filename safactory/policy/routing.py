"""Several OpenAI-compatible servers as one policy: least-outstanding-requests routing, dead servers
taken out and tried again, every new version loaded by all of them.

Spec: `openai:<base_url>,<base_url>,...#<model>` (each base URL as in a one-server spec; the same
model name on all). `endpoint_from_spec` gives an `EndpointPolicy` for one URL and a
`RoutedPolicy` for several.

Routing: each request goes to the server with the fewest requests of this policy in flight
(ties in turn). A server that answers "down" (an `EndpointError` with status 503: connection
refused, timeouts, 5xx or 429; each server gets one try, no retries of its own) is taken out for a
cool-down that doubles with each failure in a row (`cooldown_s` up to `max_cooldown_s`), and the
request goes to the next server; once its cool-down is over a server gets requests again, and one
success puts it fully back. Every server tried and down: an `EndpointError` (503) that says so. A
request a server refused (4xx, a malformed answer) is not sent elsewhere: it would be refused
again.

Versions: `load_weights(path, version)` asks every server at once. Those that load it serve it;
one that fails (or is down) is left out of routing until a later version loads there (it serves
an older version meanwhile). If none loads it the call fails and every server keeps the version
it had. With `ServedPolicy` and `rollout.server: safactory`, every published version therefore
reaches every live server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from safactory.policy.base import Completion, SamplingParams
from safactory.policy.endpoint import EndpointError, EndpointPolicy
from safactory.types import Message, ToolSpec

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Server:
    client: EndpointPolicy
    outstanding: int = 0
    down_until: float = 0.0
    failures: int = 0  # failures in a row
    stale: bool = False  # missed the last version: out of routing until a later one loads


class RoutedPolicy:
    """A Policy over several servers of the same model; see the module docstring."""

    def __init__(self, servers: list[EndpointPolicy], *, cooldown_s: float = 1.0, max_cooldown_s: float = 60.0) -> None:
        if not servers:
            raise ValueError("a routed policy needs at least one server")
        self.servers = [_Server(s) for s in servers]
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._version = servers[0].version
        self._turn = 0

    @classmethod
    def from_spec(cls, spec: str, api_key: str | None = None, **kwargs: Any) -> RoutedPolicy:
        """`openai:<url>,<url>,...#<model>` -> a RoutedPolicy (one try per server and request)."""
        head, sep, model = spec.rpartition("#")
        urls = [u.strip() for u in head.removeprefix("openai:").split(",")] if head.startswith("openai:") else []
        if not sep or not urls or not all(urls):
            raise ValueError(f"endpoint spec {spec!r} must look like 'openai:<base_url>,<base_url>,...#<model>'")
        kwargs.setdefault("max_attempts", 1)
        return cls([EndpointPolicy.from_spec(f"openai:{u}#{model}", api_key=api_key, **kwargs) for u in urls])

    # ---- what ServedPolicy and the runner read and set -------------------------------------
    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, value: int) -> None:
        self._version = value
        for server in self.servers:
            server.client.version = value

    @property
    def model(self) -> str:
        return self.servers[0].client.model

    @model.setter
    def model(self, value: str) -> None:
        for server in self.servers:
            server.client.model = value

    @property
    def base_url(self) -> str:
        return self.servers[0].client.base_url

    @property
    def spec(self) -> str:
        urls = ",".join(s.client.base_url for s in self.servers)
        return f"openai:{urls}#{self.model}"

    def status(self) -> list[dict[str, Any]]:
        """Each server: its URL, requests in flight, whether it is in routing now, failures in a row."""
        now = time.monotonic()
        return [
            {
                "base_url": s.client.base_url,
                "outstanding": s.outstanding,
                "live": not s.stale and s.down_until <= now,
                "stale": s.stale,
                "failures": s.failures,
            }
            for s in self.servers
        ]

    # ---- routing -----------------------------------------------------------------------------
    def _pick(self, tried: set[int]) -> _Server | None:
        """The live server not tried yet with the fewest requests in flight (ties: in turn)."""
        now = time.monotonic()
        n = len(self.servers)
        order = [(i + self._turn) % n for i in range(n)]
        live = [i for i in order if i not in tried and not self.servers[i].stale and self.servers[i].down_until <= now]
        if not live:
            return None
        best = min(live, key=lambda i: self.servers[i].outstanding)  # first of the least busy in turn order
        self._turn = (best + 1) % n
        tried.add(best)
        return self.servers[best]

    def _down(self, server: _Server, exc: BaseException) -> None:
        server.failures += 1
        wait = min(self.cooldown_s * 2 ** (server.failures - 1), self.max_cooldown_s)
        server.down_until = time.monotonic() + wait
        log.warning("%s is down (%r); out of routing for %.1f s", server.client.base_url, exc, wait)

    async def _route(self, what: str, call: Callable[[EndpointPolicy], Awaitable[T]]) -> T:
        tried: set[int] = set()
        last: EndpointError | None = None
        while (server := self._pick(tried)) is not None:
            server.outstanding += 1
            try:
                result = await call(server.client)
            except EndpointError as exc:
                if exc.status_code != 503:
                    raise  # refused, not down: another server would refuse it too
                self._down(server, exc)
                last = exc
                continue
            finally:
                server.outstanding -= 1
            server.failures = 0
            return result
        raise EndpointError(
            f"{what}: no server of {self.spec} is up (each down one is tried again after its cool-down); "
            f"last error: {last!r}",
            503,
        ) from last

    # ---- Policy ---------------------------------------------------------------------------------
    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        return await self._route("chat completion", lambda c: c.generate(messages, tools, sampling))

    async def score(self, token_ids: list[int]) -> list[float | None]:
        return await self._route("prompt scoring", lambda c: c.score(token_ids))

    async def load_weights(self, path: str, version: int | None = None) -> int:
        """Have every server load the saved model at `path` as `version` (default: the next)."""
        target = self._version + 1 if version is None else version
        results = await asyncio.gather(
            *(s.client.load_weights(path, target) for s in self.servers), return_exceptions=True
        )
        errors = [r if isinstance(r, BaseException) else None for r in results]
        if all(e is not None for e in errors):
            first = errors[0]
            raise EndpointError(f"no server of {self.spec} loaded v{target}: {first!r}") from first
        self.loaded(target, errors)
        return target

    def loaded(self, version: int, errors: list[BaseException | None]) -> None:
        """Version `version` is served now by the servers whose entry of `errors` (in server order) is None;
        the others leave routing until a later version loads there."""
        for server, error in zip(self.servers, errors, strict=True):
            if error is not None:
                server.stale = True
                url = server.client.base_url
                log.warning("%s did not load v%d (%r): out of routing until a later version loads", url, version, error)
            else:
                server.stale, server.failures, server.down_until = False, 0, 0.0
        self.version = version

    async def close(self) -> None:
        await asyncio.gather(*(s.client.close() for s in self.servers))


def endpoint_from_spec(spec: str, api_key: str | None = None, **kwargs: Any) -> EndpointPolicy | RoutedPolicy:
    """The policy of an endpoint spec: one server (`EndpointPolicy`) or several (`RoutedPolicy`)."""
    head = spec.rpartition("#")[0]
    if "," in head:
        return RoutedPolicy.from_spec(spec, api_key=api_key, **kwargs)
    return EndpointPolicy.from_spec(spec, api_key=api_key, **kwargs)


__all__ = ["RoutedPolicy", "endpoint_from_spec"]
