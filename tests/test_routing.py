"""Several policy servers behind one policy (`openai:<url>,<url>#<model>`), over real loopback HTTP:
least-outstanding routing, a dead server taken out and tried again, each version loaded by all."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from safactory.policy.base import Completion, SamplingParams
from safactory.policy.endpoint import EndpointError, EndpointPolicy
from safactory.policy.models import save_model
from safactory.policy.routing import RoutedPolicy, endpoint_from_spec
from safactory.policy.served import ServedPolicy
from safactory.policy.server import BackgroundServer, create_policy_app
from safactory.types import Message
from tests.conftest import perturbed
from tests.pg_server import free_port

USER = [Message(role="user", content="Compute 12+3.")]
GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


class Slow:
    """Answers after a short wait and counts what it was asked (one per server)."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.version = 0
        self.calls = 0
        self.delay_s = delay_s

    async def generate(self, messages, tools, sampling) -> Completion:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return Completion(text="ok", policy_version=self.version)


def spec_of(*servers: BackgroundServer) -> str:
    return f"openai:{','.join(s.url for s in servers)}#m"


def test_a_spec_with_several_urls_is_routed_and_one_url_is_not():
    assert isinstance(endpoint_from_spec("openai:http://127.0.0.1:1/v1#m"), EndpointPolicy)
    routed = endpoint_from_spec("openai:http://127.0.0.1:1,http://127.0.0.1:2/v1#m")
    assert isinstance(routed, RoutedPolicy)
    assert [s["base_url"] for s in routed.status()] == ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"]
    for bad in ("openai:http://a:1,#m", "openai:http://a:1,http://b:2", "http:a,b#m"):
        with pytest.raises(ValueError):
            RoutedPolicy.from_spec(bad)


def test_requests_go_to_the_server_with_the_fewest_in_flight(serve):
    policies = [Slow(), Slow()]
    servers = [serve(create_policy_app(p, model_name="m")) for p in policies]
    routed = RoutedPolicy.from_spec(spec_of(*servers))

    async def burst() -> list[Completion]:
        try:
            return await asyncio.gather(*(routed.generate(USER, [], GREEDY) for _ in range(12)))
        finally:
            await routed.close()

    assert [c.text for c in asyncio.run(burst())] == ["ok"] * 12
    assert sorted(p.calls for p in policies) == [6, 6]  # 12 at once: each takes the server with fewer in flight


def test_a_slow_server_gets_fewer_requests_than_a_quick_one(serve):
    """Four clients asking one after the other: requests pile up on the slow server, so the least-outstanding
    rule sends most to the quick one (taking turns would send each half)."""
    slow, quick = Slow(delay_s=0.4), Slow(delay_s=0.01)
    routed = RoutedPolicy.from_spec(
        spec_of(serve(create_policy_app(slow, model_name="m")), serve(create_policy_app(quick, model_name="m")))
    )

    async def client() -> None:
        for _ in range(8):
            await routed.generate(USER, [], GREEDY)

    async def clients() -> None:
        try:
            await asyncio.gather(*(client() for _ in range(4)))
        finally:
            await routed.close()

    asyncio.run(clients())
    assert slow.calls + quick.calls == 32
    assert quick.calls >= 3 * slow.calls


def test_a_dead_server_is_taken_out_and_tried_again_when_it_is_back(serve):
    policies = [Slow(), Slow()]
    first = serve(create_policy_app(policies[0], model_name="m"))
    second = BackgroundServer(create_policy_app(policies[1], model_name="m")).start()
    routed = RoutedPolicy.from_spec(spec_of(first, second))
    routed.cooldown_s = 0.3

    async def ask(n: int) -> None:
        for _ in range(n):
            assert (await routed.generate(USER, [], GREEDY)).text == "ok"

    async def scenario() -> None:
        await ask(4)
        assert policies[1].calls == 2  # in turn while idle
        second.stop()
        await ask(6)  # every request answered: the dead server is left out after its first failure
        assert policies[0].calls == 2 + 6
        # taken out after failing (whether its cool-down is over by now depends on how busy the machine is)
        assert routed.status()[0]["failures"] == 0 and routed.status()[1]["failures"] >= 1
        again = BackgroundServer(create_policy_app(policies[1], model_name="m"), port=second.port).start()
        try:
            # wait out its cool-down (it doubles with each failure in a row, and on a busy machine the dead server
            # may have been tried again during the asks above)
            for _ in range(400):
                if routed.status()[1]["live"]:
                    break
                await asyncio.sleep(0.05)
            await ask(4)
            assert policies[1].calls > 2  # back in routing
            assert routed.status()[1]["failures"] == 0
        finally:
            again.stop()
        first.stop()
        with pytest.raises(EndpointError, match="no server .* is up") as down:
            await ask(1)
        assert down.value.status_code == 503
        await routed.close()

    asyncio.run(scenario())


def policy_server(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`safactory serve-policy --model DIR` in a process of its own; (process, base URL)."""
    port = free_port()
    command = [sys.executable, "-c", "from safactory.cli import main; main()"]
    command += ["serve-policy", "--model", str(directory), "--port", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}/v1"


def wait_until_up(proc: subprocess.Popen[bytes], url: str) -> str:
    """The name of the model the server serves, once it answers."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "the server exited"
        assert time.monotonic() < deadline, "the server did not start"
        try:
            return httpx.get(f"{url}/models", timeout=2).json()["data"][0]["id"]
        except httpx.TransportError:
            time.sleep(0.2)


def test_every_published_version_is_loaded_by_every_server(tiny, tmp_path):
    """Two `serve-policy` processes behind one ServedPolicy: a publish reaches both; a server that
    cannot load a version is left out of routing until a later one loads there."""
    model, tok = tiny
    save_model(model, tok, tmp_path / "start")
    procs = [policy_server(tmp_path / "start") for _ in range(2)]
    try:
        name = [wait_until_up(proc, url) for proc, url in procs][0]
        urls = [url for _, url in procs]
        routed = RoutedPolicy.from_spec(f"openai:{urls[0]},{urls[1]}#{name}")
        served = ServedPolicy(routed, model, tok, tmp_path / "published", server="safactory")
        other = perturbed(model)
        save_model(other, tok, tmp_path / "other")
        asyncio.run(publishing(routed, served, other, urls, tmp_path / "other"))
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(timeout=30)


async def publishing(routed: RoutedPolicy, served: ServedPolicy, other, urls: list[str], other_dir: Path) -> None:
    def versions() -> list[int]:
        return [httpx.get(f"{u}/models", timeout=10).json()["data"][0]["policy_version"] for u in urls]

    assert await served.publish(other.state_dict()) == 1
    assert versions() == [1, 1]
    assert {(await routed.generate(USER, [], GREEDY)).policy_version for _ in range(4)} == {1}
    # the second server is moved on to v5 behind our back: it refuses v2 (versions only go up)
    second = EndpointPolicy.from_spec(f"openai:{urls[1]}#{routed.model}")
    assert await second.load_weights(str(other_dir), 5) == 5
    await second.close()
    assert await routed.load_weights(str(other_dir), 2) == 2
    assert [s["stale"] for s in routed.status()] == [False, True]
    assert [(await routed.generate(USER, [], GREEDY)).policy_version for _ in range(4)] == [2] * 4
    assert await routed.load_weights(str(other_dir), 6) == 6  # loads everywhere: both back in routing
    assert [s["stale"] for s in routed.status()] == [False, False] and versions() == [6, 6]
    await routed.close()
