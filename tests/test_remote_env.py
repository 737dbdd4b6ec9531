"""Environments over HTTP: a real uvicorn server on loopback, HttpEnv as the client, run_episode on top."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from safactory.loopback import LoopbackHostGuard
from safactory.policy.base import SamplingParams
from safactory.sim.agent import EpisodeLimits, run_episode
from safactory.sim.env import EnvEntry, EnvRegistry
from safactory.sim.envs.arith import SPEC, ArithEnv, ArithExpert, ArithTasks
from safactory.sim.envs.http import HttpEnv, fetch_spec, register
from safactory.sim.registry import default_registry
from safactory.sim.serve import check_bind, create_env_app, serve_env
from safactory.sim.wire import (
    RemoteEnvAuthError,
    RemoteEnvError,
    RemoteEnvUnavailable,
    SessionLimitError,
    UnsafeBindError,
)
from safactory.types import Message, ToolCall, Trajectory
from tests.remote_server import free_port, running_server

TOKEN = "test-token-123"
LIMITS = EpisodeLimits()
FAST_RETRY: dict[str, Any] = {"connect_retries": 2, "backoff_s": 0.001}


class BoomEnv(ArithEnv):
    """arith whose calculator raises an unexpected exception (a bug in the env, not a ToolError)."""

    spec = dataclasses.replace(SPEC, id="boom")

    def tool_calc(self, expression: str) -> str:
        raise RuntimeError("calculator exploded")


class SlowEnv(ArithEnv):
    """arith whose calculator never answers."""

    spec = dataclasses.replace(SPEC, id="slow")

    async def tool_calc(self, expression: str) -> str:
        await asyncio.Event().wait()
        return "unreachable"


def make_registry() -> EnvRegistry:
    registry = default_registry()
    registry.register("boom", EnvEntry(factory=BoomEnv, tasks=ArithTasks, spec=BoomEnv.spec))
    registry.register("slow", EnvEntry(factory=SlowEnv, tasks=ArithTasks, spec=SlowEnv.spec))
    return registry


def client_registry(token: str | None = None) -> EnvRegistry:
    registry = EnvRegistry()
    register(registry, token=token, **FAST_RETRY)
    return registry


@pytest.fixture(scope="module")
def arith_url() -> Iterator[str]:
    with running_server(create_env_app("arith", make_registry(), max_sessions=64)) as url:
        yield url


def health(url: str, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{url}/health", headers=headers)
    response.raise_for_status()
    return response.json()


def episodes(factory: Any, tasks: list[Any]) -> list[Trajectory]:
    async def go() -> list[Trajectory]:
        return await asyncio.gather(
            *(
                run_episode(factory, ArithExpert(), t, seed=i, sampling=SamplingParams(), limits=LIMITS)
                for i, t in enumerate(tasks)
            )
        )

    return asyncio.run(go())


def comparable(traj: Trajectory) -> dict[str, Any]:
    return traj.model_dump(exclude={"id", "started_at", "duration_s", "content_hash", "prev_hash", "tags"})


def call(name: str, **arguments: str) -> Message:
    return Message(role="assistant", content="", tool_calls=[ToolCall(id="c0", name=name, arguments=arguments)])


def test_expert_through_http_matches_in_process(arith_url: str) -> None:
    entry = client_registry().get(arith_url)
    assert entry.spec == SPEC
    tasks = entry.tasks().tasks("test", 8)
    assert tasks == ArithTasks().tasks("test", 8)  # the server's task source, unchanged by the trip
    remote = episodes(entry.factory, tasks)
    local = episodes(ArithEnv, tasks)
    assert all(t.success and t.reward == 1.0 and t.termination == "terminated" for t in remote)
    assert [comparable(t) for t in remote] == [comparable(t) for t in local]
    assert health(arith_url)["active_sessions"] == 0  # every episode closed its session


def test_task_options_reach_the_server_task_source(arith_url: str) -> None:
    entry = client_registry().get(arith_url)
    assert entry.tasks(seed=7).tasks("train", 5) == ArithTasks(seed=7).tasks("train", 5)
    with pytest.raises(RemoteEnvError, match="HTTP 400.*validation"):
        entry.tasks().tasks("validation", 3)
    with pytest.raises(RemoteEnvError, match="HTTP 400.*no_such_option"):
        entry.tasks(no_such_option=1).tasks("train", 3)


def test_concurrent_episodes(arith_url: str) -> None:
    tasks = ArithTasks().tasks("train", 24)
    trajs = episodes(lambda: HttpEnv(arith_url, spec=SPEC), tasks)
    assert all(t.success and t.termination == "terminated" and len(t.steps) == 2 for t in trajs)
    assert [t.task.id for t in trajs] == [t.id for t in tasks]
    assert health(arith_url)["active_sessions"] == 0


def test_error_observations_and_truncation_cross_the_wire(arith_url: str) -> None:
    task = ArithTasks().tasks("train", 1)[0]

    async def go() -> list[Any]:
        env = HttpEnv(arith_url, spec=SPEC)
        try:
            obs = await env.reset(task, 0)
            results = [await env.step(call("sqrt", x="4")) for _ in range(4)]
        finally:
            await env.close()
        return [obs, *results]

    obs, *results = asyncio.run(go())
    assert obs.messages[0].content == task.prompt and [t.name for t in obs.tools] == ["calc", "answer"]
    assert "unknown tool 'sqrt'" in results[0].messages[0].content and results[0].info["errors"]
    assert results[-1].truncated and not any(r.truncated for r in results[:-1])


def test_health_and_spec(arith_url: str) -> None:
    body = health(arith_url)
    assert body["ok"] is True and body["env_id"] == "arith" and body["env_version"] == "1"
    assert body["max_sessions"] == 64 and body["active_sessions"] == 0
    assert fetch_spec(arith_url) == SPEC

    async def go() -> int:
        env = await HttpEnv.connect(arith_url)  # fetches the spec without blocking the loop
        assert env.spec == SPEC
        await env.reset(ArithTasks().tasks("train", 1)[0], 0)
        during = health(arith_url)["active_sessions"]
        await env.close()
        return during

    assert asyncio.run(go()) == 1
    assert health(arith_url)["active_sessions"] == 0


def test_session_limit_gives_a_clear_error() -> None:
    task = ArithTasks().tasks("train", 1)[0]
    with running_server(create_env_app("arith", make_registry(), max_sessions=2)) as url:

        async def go() -> tuple[str, Trajectory]:
            held = [HttpEnv(url, spec=SPEC) for _ in range(2)]
            for env in held:
                await env.reset(task, 0)
            extra = HttpEnv(url, spec=SPEC)
            with pytest.raises(SessionLimitError) as caught:
                await extra.reset(task, 0)
            await extra.close()
            failed = await run_episode(
                lambda: HttpEnv(url, spec=SPEC), ArithExpert(), task, seed=0, sampling=SamplingParams(), limits=LIMITS
            )
            await held[0].close()
            freed = await run_episode(
                lambda: HttpEnv(url, spec=SPEC), ArithExpert(), task, seed=0, sampling=SamplingParams(), limits=LIMITS
            )
            await held[1].close()
            assert freed.success
            return str(caught.value), failed

        message, failed = asyncio.run(go())
        assert "session limit reached: 2 of 2" in message and "--max-sessions" in message
        assert failed.termination == "env_error" and "session limit" in (failed.error or "")
        assert health(url)["active_sessions"] == 0


def test_token_is_required_when_set() -> None:
    task = ArithTasks().tasks("train", 1)[0]
    with running_server(create_env_app("arith", make_registry(), token=TOKEN)) as url:
        assert httpx.get(f"{url}/health").status_code == 401
        wrong = httpx.get(f"{url}/health", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
        assert health(url, TOKEN)["ok"] is True
        for bad in (None, "nope"):
            with pytest.raises(RemoteEnvAuthError, match="HTTP 401.*token"):
                client_registry(bad).get(url)
            with pytest.raises(RemoteEnvAuthError, match="HTTP 401"):
                asyncio.run(HttpEnv(url, spec=SPEC, token=bad).reset(task, 0))
        entry = client_registry(TOKEN).get(url)
        trajs = episodes(entry.factory, entry.tasks().tasks("train", 3))
        assert all(t.success for t in trajs)


def test_token_from_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    with running_server(create_env_app("arith", make_registry(), token=TOKEN)) as url:
        monkeypatch.setenv("SAFACTORY_ENV_TOKEN", TOKEN)
        assert client_registry().get(url).spec == SPEC


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.com"])
def test_non_loopback_bind_without_token_is_refused(host: str) -> None:
    with pytest.raises(UnsafeBindError, match="--token"):
        serve_env("arith", host, free_port(), 4, None)
    check_bind(host, TOKEN)  # with a token it is the operator's choice


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_bind_needs_no_token(host: str) -> None:
    check_bind(host, None)


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        check_bind("127.0.0.1", "")


class CountingTransport(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        return await super().handle_async_request(request)


def test_server_down_gives_a_clear_error_after_bounded_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    transport = CountingTransport()
    env = HttpEnv(url, spec=SPEC, transport=transport, **FAST_RETRY)
    with pytest.raises(RemoteEnvUnavailable, match=r"cannot reach env server .* after 3 attempt\(s\)"):
        asyncio.run(env.reset(ArithTasks().tasks("train", 1)[0], 0))
    assert transport.requests == ["POST /sessions"] * 3
    with pytest.raises(RemoteEnvUnavailable, match="cannot reach env server"):
        client_registry().get(url)
    with pytest.raises(RemoteEnvUnavailable, match="after 3 attempt"):
        client_registry().get(url.replace("http:", "https:"))
    traj = episodes(lambda: HttpEnv(url, spec=SPEC, **FAST_RETRY), ArithTasks().tasks("train", 1))[0]
    assert traj.termination == "env_error" and "cannot reach env server" in (traj.error or "")


def test_a_step_is_never_retried() -> None:
    task = ArithTasks().tasks("train", 1)[0]
    transport = CountingTransport()

    async def go() -> HttpEnv:
        with running_server(create_env_app("arith", make_registry())) as url:
            env = HttpEnv(url, spec=SPEC, transport=transport, **FAST_RETRY)
            await env.reset(task, 0)
        with pytest.raises(RemoteEnvUnavailable, match="step"):  # the server went away mid-episode
            await env.step(call("calc", expression="1+1"))
        return env

    env = asyncio.run(go())
    assert [r for r in transport.requests if r.endswith("/step")] == [f"POST /sessions/{env.session_id}/step"]


def test_env_that_raises_in_step_ends_the_episode_with_env_error() -> None:
    with running_server(create_env_app("boom", make_registry())) as url:
        entry = client_registry().get(url)
        traj = episodes(entry.factory, entry.tasks().tasks("train", 1))[0]
        assert traj.termination == "env_error" and not traj.success
        assert len(traj.steps) == 1
        error = traj.steps[0].error or ""
        assert "HTTP 500" in error and "RuntimeError: calculator exploded" in error
        assert "calculator exploded" in (traj.error or "")
        body = health(url)
        assert body["ok"] is True and body["env_id"] == "boom" and body["active_sessions"] == 0


def test_env_that_hangs_is_timed_out_by_the_server_and_dropped() -> None:
    app = create_env_app("slow", make_registry(), env_timeout_s=0.05)
    transport = httpx.ASGITransport(app=app)
    task = ArithTasks().tasks("train", 1)[0]

    async def go() -> tuple[Trajectory, int]:
        traj = await run_episode(
            lambda: HttpEnv("http://env", spec=SlowEnv.spec, transport=transport),
            ArithExpert(),
            task,
            seed=0,
            sampling=SamplingParams(),
            limits=LIMITS,
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://env") as client:
            return traj, (await client.get("/health")).json()["active_sessions"]

    traj, active = asyncio.run(go())
    assert traj.termination == "env_timeout"  # RemoteEnvTimeout is a TimeoutError, as the agent loop expects
    assert active == 0


def test_idle_sessions_expire() -> None:
    now = [0.0]
    app = create_env_app("arith", make_registry(), idle_timeout_s=60.0, clock=lambda: now[0])
    task = ArithTasks().tasks("train", 1)[0]

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)
        env = HttpEnv("http://env", spec=SPEC, transport=transport)
        await env.reset(task, 0)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://env") as client:
            assert (await client.get("/health")).json()["active_sessions"] == 1
            now[0] = 59.0
            assert (await client.get("/health")).json()["active_sessions"] == 1
            now[0] = 200.0
            assert (await client.get("/health")).json()["active_sessions"] == 0
        with pytest.raises(RemoteEnvError, match="HTTP 404.*expired") as caught:
            await env.step(call("calc", expression="1+1"))
        assert caught.value.status == 404
        await env.close()  # closing an expired session is fine

    asyncio.run(go())


def test_unknown_session_and_bad_body_are_clear_errors(arith_url: str) -> None:
    missing = httpx.post(f"{arith_url}/sessions/nope/step", json={"action": {"role": "assistant"}})
    assert missing.status_code == 404 and missing.json()["error"] == "unknown_session"
    session = httpx.post(f"{arith_url}/sessions").json()["session_id"]
    bad = httpx.post(f"{arith_url}/sessions/{session}/step", json={"action": {"role": "robot"}})
    assert bad.status_code == 422
    before_reset = httpx.post(f"{arith_url}/sessions/{session}/step", json={"action": {"role": "assistant"}})
    assert before_reset.status_code == 409 and before_reset.json()["error"] == "reset_required"
    assert httpx.delete(f"{arith_url}/sessions/{session}").json() == {"closed": True}
    assert httpx.delete(f"{arith_url}/sessions/{session}").status_code == 404


def test_bad_urls_and_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="not an env server URL"):
        HttpEnv("ftp://host:1", spec=SPEC)
    with pytest.raises(ValueError, match="max_sessions"):
        create_env_app("arith", make_registry(), max_sessions=0)
    with pytest.raises(KeyError, match="unknown environment"):
        create_env_app("nope", make_registry())


class GatedEnv(ArithEnv):
    """arith whose construction and calculator block their thread until the test opens a gate."""

    spec = dataclasses.replace(SPEC, id="gated")
    gate = threading.Event()
    entered = threading.Event()

    def __init__(self) -> None:
        super().__init__()
        if not self.gate.is_set():
            self.entered.set()
            self.gate.wait(30)

    def tool_calc(self, expression: str) -> str:  # a synchronous simulator step
        self.entered.set()
        self.gate.wait(30)
        return "4"


def gated_app(**settings: Any) -> Any:
    registry = default_registry()
    registry.register("gated", EnvEntry(factory=GatedEnv, tasks=ArithTasks, spec=GatedEnv.spec))
    GatedEnv.gate.clear()
    GatedEnv.entered.clear()
    return create_env_app("gated", registry, **settings)


def wait_for_sessions(url: str, count: int, deadline_s: float = 20.0) -> int:
    """Poll /health until `count` sessions are active (or the deadline passes); returns the last count."""
    deadline = time.monotonic() + deadline_s
    while (active := health(url)["active_sessions"]) != count and time.monotonic() < deadline:
        time.sleep(0.02)
    return active


def test_a_session_whose_creation_was_given_up_on_is_still_released() -> None:
    """The client gives up while POST /sessions is pending; close() must still free the server's slot."""
    task = ArithTasks().tasks("train", 1)[0]
    with running_server(gated_app(max_sessions=1)) as url:

        async def go() -> None:
            env = HttpEnv(url, spec=GatedEnv.spec)
            opening = asyncio.ensure_future(env.reset(task, 0))
            assert await asyncio.to_thread(GatedEnv.entered.wait, 10)  # the server is building the env
            opening.cancel()  # the episode's env timeout, or a cancelled run
            with contextlib.suppress(asyncio.CancelledError):
                await opening
            await env.close()

        try:
            asyncio.run(go())
        finally:
            GatedEnv.gate.set()  # the env build finishes only now, after the client closed
        assert wait_for_sessions(url, 0) == 0
        assert httpx.post(f"{url}/sessions").status_code == 200  # the one slot is free again

        # A DELETE that overtakes its POST: the session is never created.
        early = "x" * 24
        assert httpx.delete(f"{url}/sessions/{early}").status_code == 404
        late = httpx.post(f"{url}/sessions", json={"session_id": early})
        assert late.status_code == 409 and late.json()["error"] == "session_closed"


def test_a_synchronous_step_stalls_only_its_own_session_and_is_timed_out() -> None:
    with running_server(gated_app(env_timeout_s=0.2)) as url:
        GatedEnv.gate.set()  # build without waiting
        session = httpx.post(f"{url}/sessions").json()["session_id"]
        task = ArithTasks().tasks("train", 1)[0].model_dump(mode="json")
        assert httpx.post(f"{url}/sessions/{session}/reset", json={"task": task, "seed": 0}).status_code == 200
        GatedEnv.gate.clear()
        GatedEnv.entered.clear()
        action = call("calc", expression="2+2").model_dump(mode="json")
        try:
            with ThreadPoolExecutor(1) as pool:
                stepping = pool.submit(
                    httpx.post, f"{url}/sessions/{session}/step", json={"action": action}, timeout=30
                )
                assert GatedEnv.entered.wait(10)  # the step is computing (blocking its thread)
                # The server still answers, and times the stuck step out, while the env is blocked.
                assert httpx.get(f"{url}/health", timeout=10).json()["ok"] is True
                answer = stepping.result(timeout=10)
                assert answer.status_code == 504 and answer.json()["error"] == "env_timeout"
                assert not GatedEnv.gate.is_set()  # answered before the env finished
        finally:
            GatedEnv.gate.set()
        assert wait_for_sessions(url, 0) == 0  # the timed-out session was dropped


def test_blank_tokens_and_tokens_with_spaces() -> None:
    from typer.testing import CliRunner

    from safactory.cli import app

    result = CliRunner().invoke(
        app, ["serve-env", "arith", "--port", str(free_port())], env={"SAFACTORY_ENV_TOKEN": " "}
    )
    assert result.exit_code == 2 and "token must not be empty" in result.output
    with running_server(create_env_app("arith", make_registry(), token=f" {TOKEN} ")) as url:
        assert fetch_spec(url, token=TOKEN) == SPEC
        assert fetch_spec(url, token=f" {TOKEN}\t") == SPEC
        with pytest.raises(RemoteEnvAuthError):
            fetch_spec(url, token="other")


def test_a_tokenless_server_answers_loopback_host_names_only() -> None:
    """DNS rebinding: a web page whose host name resolves to 127.0.0.1 sends its own name as Host."""
    app = LoopbackHostGuard(create_env_app("arith", make_registry()))

    async def status(base_url: str) -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as client:
            return (await client.get("/health")).status_code

    for url in ("http://127.0.0.1:8790", "http://localhost:8790", "http://[::1]:8790", "http://127.0.0.2"):
        assert asyncio.run(status(url)) == 200, url
    for url in ("http://attacker.example", "http://attacker.example:8790", "http://10.0.0.5:8790"):
        assert asyncio.run(status(url)) == 403, url
