"""Publishing to vLLM and SGLang, against a real loopback HTTP server that speaks their routes.

Neither server runs without a GPU, so `FakeServer` is a real FastAPI app on uvicorn that
implements the routes `safactory.policy.inference_servers` calls, with the request and answer
shapes of vLLM 0.33.0 and SGLang 0.5.23: bodies are validated (a missing field is answered 400, as
both servers do; unknown fields are refused too, stricter than the real ones, so a misspelt
optional field fails here), adapters and model directories are opened from disk as a server
would, errors come in each server's own shape, and any route can be told to refuse or to hang.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file

from safactory.policy.inference_servers import SGLangPublisher, VLLMPublisher, publisher_for, server_root
from safactory.policy.models import TinyModelSpec, add_lora, build_tiny
from safactory.policy.publish import DiskPublisher, PublishError
from safactory.policy.server import BackgroundServer

SMALL = TinyModelSpec(hidden_size=64, layers=2, heads=4, intermediate_size=128, max_positions=512)
BASE = "tiny-base"
MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank
KINDS = ["vllm", "sglang"]
PUBLISHERS = {"vllm": VLLMPublisher, "sglang": SGLangPublisher}
LOAD = {"vllm": "/v1/load_lora_adapter", "sglang": "/load_lora_adapter"}
UNLOAD = {"vllm": "/v1/unload_lora_adapter", "sglang": "/unload_lora_adapter"}
FULL = {"vllm": "/collective_rpc", "sglang": "/update_weights_from_disk"}


# ---- request bodies, as the real servers declare them (all fields; unknown ones refused) ----------
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VLLMLoad(Strict):  # vllm/entrypoints/serve/lora/protocol.py
    lora_name: str
    lora_path: str
    load_inplace: bool = False
    is_3d_lora_weight: bool = False


class VLLMUnload(Strict):
    lora_name: str
    lora_int_id: int | None = None


class VLLMRpc(Strict):  # vllm/entrypoints/serve/dev/rpc/api_router.py reads these keys
    method: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    timeout: float | None = None


class SGLangLoad(Strict):  # sglang/srt/managers/io_struct.py LoadLoRAAdapterReqInput
    lora_name: str
    lora_path: str
    pinned: bool = False
    lora_id: str | None = None


class SGLangUnload(Strict):
    lora_name: str
    lora_id: str | None = None


class SGLangUpdate(Strict):  # UpdateWeightFromDiskReqInput
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0
    flush_cache: bool = True
    manifest: dict[str, Any] | None = None


class FakeServer:
    """A vLLM- or SGLang-shaped server: loaded adapters, the weights directory, every call made."""

    def __init__(self, kind: str, api_key: str | None = None) -> None:
        self.kind = kind
        self.api_key = api_key
        self.calls: list[tuple[str, dict[str, Any] | None]] = []
        self.adapters: dict[str, str] = {}
        self.weights: str | None = None
        self.weight_version: str | None = None
        self.refuse: dict[str, int] = {}  # route -> how many more calls to refuse
        self.hang: set[str] = set()
        self.release = threading.Event()
        self.prefix_cache_resets = 0
        self.app = self._build()

    # ---- answers in each server's shape ----
    def error(self, message: str, status: int) -> JSONResponse:
        if self.kind == "vllm":
            kind = "NotFoundError" if status == 404 else "BadRequestError"
            return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)
        return JSONResponse({"object": "error", "message": message, "type": "Bad Request", "code": status}, status)

    def lora_result(self, ok: bool, message: str | None = None, status: int = 400) -> Response:
        if self.kind == "vllm":
            return Response(message or "", status_code=200) if ok else self.error(message or "", status)
        body = {"success": ok, "error_message": None if ok else message, "loaded_adapters": dict(self.adapters)}
        return JSONResponse(body, status_code=200 if ok else 400)

    async def gate(self, route: str) -> Response | None:
        """Hang or refuse on demand; None lets the call through."""
        if route in self.hang:
            for _ in range(200):
                if self.release.is_set():
                    break
                await asyncio.sleep(0.05)
        if self.refuse.get(route, 0) > 0:
            self.refuse[route] -= 1
            if route == FULL["vllm"]:  # a worker exception: vLLM answers 500
                return JSONResponse({"error": {"message": "RuntimeError: shape mismatch", "code": 500}}, 500)
            if route == FULL["sglang"]:
                return JSONResponse(
                    {"success": False, "message": "Failed to update weights", "num_paused_requests": 0}, 400
                )
            return self.lora_result(False, "injected failure: cannot load adapter", 400)
        return None

    # ---- what the servers check on disk ----
    @staticmethod
    def adapter_problem(path: str) -> str | None:
        directory = Path(path)
        if not (directory / "adapter_config.json").is_file() or not (directory / "adapter_model.safetensors").is_file():
            return f"No adapter found for {path}"
        config = json.loads((directory / "adapter_config.json").read_text())
        if int(config["r"]) > MAX_LORA_RANK:
            return f"LoRA rank {config['r']} is greater than max_lora_rank {MAX_LORA_RANK}"
        if not any(".lora_A." in name for name in load_file(str(directory / "adapter_model.safetensors"))):
            return "adapter_model.safetensors holds no LoRA weights"
        return None

    @staticmethod
    def model_problem(path: str) -> str | None:
        directory = Path(path)
        if not (directory / "config.json").is_file():
            return f"{path} has no config.json"
        files = list(directory.glob("*.safetensors"))
        if not files or not all(load_file(str(f)) for f in files):
            return f"{path} has no safetensors weights"
        return None

    def _build(self) -> FastAPI:
        app = FastAPI()
        server = self

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            return server.error(f"invalid request: {exc.errors()}", 400)  # both servers map 422 to 400

        @app.middleware("http")
        async def auth(request: Request, call_next: Any) -> Response:
            if server.api_key and request.headers.get("authorization") != f"Bearer {server.api_key}":
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            if request.method == "POST" and request.headers.get("content-type", "").split(";")[0] not in (
                "application/json",
                "",
            ):
                return server.error("Unsupported Media Type: Only 'application/json' is allowed", 400)
            return await call_next(request)

        def record(route: str, body: BaseModel | None) -> None:
            server.calls.append((route, body.model_dump(exclude_unset=True) if body is not None else None))

        async def load(route: str, name: str, path: str) -> Response:
            if (gated := await server.gate(route)) is not None:
                return gated
            if name in server.adapters:
                return server.lora_result(False, f"The lora adapter '{name}' has already been loaded.", 400)
            if (problem := server.adapter_problem(path)) is not None:
                return server.lora_result(False, problem, 404 if problem.startswith("No adapter") else 400)
            server.adapters[name] = path
            return server.lora_result(True, f"Success: LoRA adapter '{name}' added successfully.")

        async def unload(route: str, name: str) -> Response:
            if (gated := await server.gate(route)) is not None:
                return gated
            if name not in server.adapters:
                return server.lora_result(False, f"The lora adapter '{name}' cannot be found.", 404)
            del server.adapters[name]
            return server.lora_result(True, f"Success: LoRA adapter '{name}' removed successfully.")

        if self.kind == "vllm":

            @app.post("/v1/load_lora_adapter")
            async def vllm_load(body: VLLMLoad) -> Response:
                record("/v1/load_lora_adapter", body)
                return await load("/v1/load_lora_adapter", body.lora_name, body.lora_path)

            @app.post("/v1/unload_lora_adapter")
            async def vllm_unload(body: VLLMUnload) -> Response:
                record("/v1/unload_lora_adapter", body)
                return await unload("/v1/unload_lora_adapter", body.lora_name)

            @app.post("/collective_rpc")
            async def rpc(body: VLLMRpc) -> Response:
                record("/collective_rpc", body)
                if (gated := await server.gate("/collective_rpc")) is not None:
                    return gated
                path = body.kwargs.get("weights_path")
                if body.method != "reload_weights" or not isinstance(path, str):
                    return JSONResponse({"error": {"message": f"bad rpc {body.method}", "code": 500}}, 500)
                if (problem := server.model_problem(path)) is not None:
                    return JSONResponse({"error": {"message": problem, "code": 500}}, 500)
                server.weights = path
                return JSONResponse({"results": [None]})

            @app.post("/reset_prefix_cache")
            async def reset(request: Request) -> Response:
                server.calls.append(("/reset_prefix_cache", None))
                server.prefix_cache_resets += 1
                return Response(status_code=200)

            @app.get("/v1/models")
            async def models() -> JSONResponse:
                ids = [BASE, *server.adapters]
                return JSONResponse({"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})

        else:

            @app.post("/load_lora_adapter")
            async def sglang_load(body: SGLangLoad) -> Response:
                record("/load_lora_adapter", body)
                return await load("/load_lora_adapter", body.lora_name, body.lora_path)

            @app.post("/unload_lora_adapter")
            async def sglang_unload(body: SGLangUnload) -> Response:
                record("/unload_lora_adapter", body)
                return await unload("/unload_lora_adapter", body.lora_name)

            @app.post("/update_weights_from_disk")
            async def update(body: SGLangUpdate) -> Response:
                record("/update_weights_from_disk", body)
                if (gated := await server.gate("/update_weights_from_disk")) is not None:
                    return gated
                if (problem := server.model_problem(body.model_path)) is not None:
                    return JSONResponse({"success": False, "message": problem, "num_paused_requests": 0}, 400)
                server.weights, server.weight_version = body.model_path, body.weight_version
                return JSONResponse(
                    {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
                )

        return app

    def routes(self) -> list[str]:
        return [route for route, _ in self.calls]


@pytest.fixture
def fake():
    """Start FakeServers on loopback: `fake(kind, api_key=None) -> (server, base_url)`."""
    running: list[tuple[FakeServer, BackgroundServer]] = []

    def start(kind: str, api_key: str | None = None) -> tuple[FakeServer, str]:
        server = FakeServer(kind, api_key)
        background = BackgroundServer(server.app).start()
        running.append((server, background))
        return server, f"http://127.0.0.1:{background.port}"

    yield start
    for server, background in running:
        server.release.set()
        background.stop()


@pytest.fixture(scope="module")
def models():
    """A LoRA model (random adapter weights, so versions differ) and a separate full model."""
    base, tokenizer = build_tiny(SMALL, seed=0)
    lora_model = add_lora(base, r=4, zero_init=False)
    full, _ = build_tiny(SMALL, seed=1)
    return lora_model, full, tokenizer


def publisher(kind: str, url: str, tmp_path: Path, tokenizer: Any, *, lora: bool, **kwargs: Any) -> Any:
    disk = DiskPublisher(tmp_path / "published", tokenizer)
    return PUBLISHERS[kind](url, disk, model_name=BASE, lora=lora, timeout_s=kwargs.pop("timeout_s", 10.0), **kwargs)


# ---- LoRA -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_lora_publish_loads_the_new_adapter_then_unloads_the_old(kind, fake, models, tmp_path):
    lora_model, _, tokenizer = models
    server, url = fake(kind)
    pub = publisher(kind, url, tmp_path, tokenizer, lora=True)

    assert asyncio.run(pub.publish(lora_model, 1)) == 1
    assert server.calls == [(LOAD[kind], {"lora_name": "safactory-v000001", "lora_path": str(pub.disk.path(1))})]

    assert asyncio.run(pub.publish(lora_model, 2)) == 2
    assert server.calls[1:] == [
        (LOAD[kind], {"lora_name": "safactory-v000002", "lora_path": str(pub.disk.path(2))}),
        (UNLOAD[kind], {"lora_name": "safactory-v000001"}),
    ]
    assert server.adapters == {"safactory-v000002": str(pub.disk.path(2))}
    assert pub.version == 2
    sent = Path(server.calls[1][1]["lora_path"])
    assert (sent / "adapter_config.json").is_file() and (sent / "adapter_model.safetensors").is_file()
    assert not (sent / "config.json").exists()  # the adapter only, not a full model
    if kind == "vllm":
        assert pub.served_model(2) == "safactory-v000002"
        listed = httpx.get(f"{url}/v1/models").json()["data"]
        assert pub.served_model() in [m["id"] for m in listed]
    else:
        assert pub.served_model(2) == f"{BASE}:safactory-v000002"  # SGLang's base-model:adapter syntax


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_lora_load_keeps_the_old_adapter_serving(kind, fake, models, tmp_path):
    lora_model, _, tokenizer = models
    server, url = fake(kind)
    pub = publisher(kind, url, tmp_path, tokenizer, lora=True)
    asyncio.run(pub.publish(lora_model, 1))

    server.refuse[LOAD[kind]] = 1
    with pytest.raises(PublishError) as failure:
        asyncio.run(pub.publish(lora_model, 2))
    message = str(failure.value)
    assert url in message and "v2" in message and "injected failure" in message
    assert pub.version == 1 and pub.served_model() == pub.served_model(1)
    assert server.adapters == {"safactory-v000001": str(pub.disk.path(1))}
    assert UNLOAD[kind] not in server.routes()

    assert asyncio.run(pub.publish(lora_model, 3)) == 3  # the next version goes through and replaces v1
    assert server.adapters == {"safactory-v000003": str(pub.disk.path(3))}


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_unload_keeps_the_new_version_and_is_retried(kind, fake, models, tmp_path):
    lora_model, _, tokenizer = models
    server, url = fake(kind)
    pub = publisher(kind, url, tmp_path, tokenizer, lora=True)
    asyncio.run(pub.publish(lora_model, 1))
    server.refuse[UNLOAD[kind]] = 1

    assert asyncio.run(pub.publish(lora_model, 2)) == 2  # v2 serves; v1 could not be unloaded yet
    assert set(server.adapters) == {"safactory-v000001", "safactory-v000002"}

    asyncio.run(pub.publish(lora_model, 3))
    assert set(server.adapters) == {"safactory-v000003"}


def test_lora_refuses_a_directory_that_is_not_an_adapter(fake, models, tmp_path):
    lora_model, full, tokenizer = models
    server, url = fake("vllm")
    with pytest.raises(PublishError, match="not a LoRA adapter"):
        asyncio.run(publisher("vllm", url, tmp_path / "a", tokenizer, lora=True).publish(full, 1))
    with pytest.raises(PublishError, match="not a full model directory"):
        asyncio.run(publisher("vllm", url, tmp_path / "b", tokenizer, lora=False).publish(lora_model, 1))
    assert server.calls == []


# ---- full weights -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_full_weights_publish_sends_the_model_directory(kind, fake, models, tmp_path):
    _, full, tokenizer = models
    server, url = fake(kind)
    pub = publisher(kind, url, tmp_path, tokenizer, lora=False)

    assert asyncio.run(pub.publish(full, 4)) == 4
    path = str(pub.disk.path(4))
    assert server.weights == path
    assert (Path(path) / "config.json").is_file() and list(Path(path).glob("*.safetensors"))
    if kind == "vllm":
        rpc = {"method": "reload_weights", "kwargs": {"weights_path": path, "is_checkpoint_format": True}}
        assert server.calls[0][0] == "/collective_rpc"
        assert {k: server.calls[0][1][k] for k in ("method", "kwargs")} == rpc
        assert server.routes() == ["/collective_rpc", "/reset_prefix_cache"]  # no KV from the old weights
    else:
        assert server.calls == [("/update_weights_from_disk", {"model_path": path, "weight_version": "4"})]
        assert server.weight_version == "4"
    assert pub.served_model(4) == BASE and pub.version == 4


@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_weight_reload_keeps_the_version(kind, fake, models, tmp_path):
    _, full, tokenizer = models
    server, url = fake(kind)
    pub = publisher(kind, url, tmp_path, tokenizer, lora=False, version=7)
    server.refuse[FULL[kind]] = 1
    with pytest.raises(PublishError) as failure:
        asyncio.run(pub.publish(full, 8))
    assert url in str(failure.value) and "v8" in str(failure.value)
    assert pub.version == 7 and server.weights is None
    assert "/reset_prefix_cache" not in server.routes()


# ---- outages ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_dead_server_is_a_publish_error(kind, models, tmp_path):
    _, full, tokenizer = models
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pub = publisher(kind, f"http://127.0.0.1:{port}", tmp_path, tokenizer, lora=False, version=1)
    with pytest.raises(PublishError, match="unreachable") as failure:
        asyncio.run(pub.publish(full, 2))
    assert f"127.0.0.1:{port}" in str(failure.value) and "v2" in str(failure.value)
    assert pub.version == 1


def test_a_server_that_does_not_answer_times_out(fake, models, tmp_path):
    _, full, tokenizer = models
    server, url = fake("sglang")
    server.hang.add("/update_weights_from_disk")
    pub = publisher("sglang", url, tmp_path, tokenizer, lora=False, version=1, timeout_s=0.3)
    with pytest.raises(PublishError, match="did not answer"):
        asyncio.run(pub.publish(full, 2))
    assert pub.version == 1


def test_api_key_is_sent_as_a_bearer_token(fake, models, tmp_path):
    _, full, tokenizer = models
    server, url = fake("sglang", api_key="sekret")
    with pytest.raises(PublishError, match="HTTP 401"):
        asyncio.run(publisher("sglang", url, tmp_path / "a", tokenizer, lora=False).publish(full, 1))
    pub = publisher("sglang", url, tmp_path / "b", tokenizer, lora=False, api_key="sekret")
    assert asyncio.run(pub.publish(full, 1)) == 1


# ---- the fake itself, and spec strings --------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_the_fake_server_refuses_wrong_field_names(kind, fake, tmp_path):
    server, url = fake(kind)
    answer = httpx.post(url + LOAD[kind], json={"name": "x", "path": str(tmp_path)})
    assert answer.status_code == 400
    answer = httpx.post(url + LOAD[kind], json={"lora_name": "x", "lora_path": str(tmp_path)})
    assert answer.status_code in (400, 404)  # an empty directory is no adapter
    assert server.adapters == {}


def test_publisher_for_reads_spec_strings(tmp_path):
    disk = DiskPublisher(tmp_path, tokenizer=None)
    pub = publisher_for("vllm:http://gpu:8000/v1", disk, model_name=BASE, lora=True)
    assert isinstance(pub, VLLMPublisher) and pub.base_url == "http://gpu:8000" and pub.lora
    pub = publisher_for("sglang:http://gpu:30000/", disk, model_name=BASE, lora=False, api_key="k")
    assert isinstance(pub, SGLangPublisher) and pub.base_url == "http://gpu:30000" and pub.api_key == "k"
    for bad in ("openai:http://gpu:8000", "vllm", "vllm:gpu:8000", "sglang:"):
        with pytest.raises(ValueError):
            publisher_for(bad, disk, model_name=BASE, lora=False)
    assert server_root("http://h:1/v1/") == "http://h:1"


# ---- the loop's side: ServedPolicy publishing to vLLM / SGLang ---------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_served_policy_publishes_lora_versions_and_names_them_in_requests(kind, fake, models, tmp_path):
    from safactory.policy.endpoint import EndpointPolicy
    from safactory.policy.served import ServedPolicy
    from safactory.policy.weights import version_state

    lora_model, _, tokenizer = models
    server, url = fake(kind)
    endpoint = EndpointPolicy(f"{url}/v1", BASE)
    served = ServedPolicy(endpoint, lora_model, tokenizer, tmp_path / "published", server=kind)
    weights = version_state(lora_model)
    assert set(weights) and all("lora_" in k for k in weights)  # only the adapter travels
    assert asyncio.run(served.publish(weights)) == 1
    assert asyncio.run(served.publish(weights)) == 2
    assert server.routes() == [LOAD[kind], LOAD[kind], UNLOAD[kind]]
    expected = "safactory-v000002" if kind == "vllm" else f"{BASE}:safactory-v000002"
    assert endpoint.model == expected and served.version == 2
    server.refuse[LOAD[kind]] = 1  # a refused version: the old adapter keeps serving, requests still name it
    with pytest.raises(PublishError):
        asyncio.run(served.publish(weights))
    assert endpoint.model == expected and served.version == 2


@pytest.mark.parametrize("kind", KINDS)
def test_several_servers_each_load_every_version_and_one_that_fails_leaves_routing(kind, fake, models, tmp_path):
    from safactory.policy.routing import RoutedPolicy
    from safactory.policy.served import ServedPolicy
    from safactory.policy.weights import version_state

    lora_model, _, tokenizer = models
    (a, url_a), (b, url_b) = fake(kind), fake(kind)
    endpoint = RoutedPolicy.from_spec(f"openai:{url_a}/v1,{url_b}/v1#{BASE}")
    served = ServedPolicy(endpoint, lora_model, tokenizer, tmp_path / "published", server=kind)
    weights = version_state(lora_model)
    assert asyncio.run(served.publish(weights)) == 1
    assert a.routes() == b.routes() == [LOAD[kind]]  # the same version on both servers
    assert sorted(p.name for p in (tmp_path / "published").iterdir()) == ["v000001"]  # written once
    expected = "safactory-v000002" if kind == "vllm" else f"{BASE}:safactory-v000002"
    b.refuse[LOAD[kind]] = 1  # b cannot load v2: a serves it, b leaves routing until a later version loads there
    assert asyncio.run(served.publish(weights)) == 2
    assert endpoint.model == expected and served.version == 2
    assert [s["stale"] for s in endpoint.status()] == [False, True]
    assert asyncio.run(served.publish(weights)) == 3  # b loads v3 and is back
    assert [s["stale"] for s in endpoint.status()] == [False, False]
    a.refuse[LOAD[kind]] = b.refuse[LOAD[kind]] = 1  # nobody loads v4: an error, v3 keeps serving
    with pytest.raises(PublishError):
        asyncio.run(served.publish(weights))
    assert served.version == 3


@pytest.mark.parametrize("kind", KINDS)
def test_ray_workers_follow_the_model_name_each_lora_version_is_served_under(kind, fake, models, tmp_path):
    """With an endpoint on vLLM/SGLang, a LoRA version is a model of its own: the controller's jobs carry its
    name and a rollout worker behind takes it with the version (no Ray needed: the worker body, driven)."""
    from safactory.data.group_writer import StoreTarget
    from safactory.factory.ray_rollouts import ServedWeights
    from safactory.policy.base import SamplingParams
    from safactory.policy.endpoint import EndpointPolicy
    from safactory.policy.served import ServedPolicy
    from safactory.policy.weights import version_state
    from safactory.sim.agent import EpisodeLimits
    from safactory.sim.ray_worker import EndpointPolicyFactory, GroupJob, RolloutWorker, WorkerSetup
    from safactory.types import Task

    lora_model, _, tokenizer = models
    server, url = fake(kind)
    served = ServedPolicy(EndpointPolicy(f"{url}/v1", BASE), lora_model, tokenizer, tmp_path / "published", server=kind)
    weights = ServedWeights(served)
    assert weights.served_model(0) == BASE  # nothing published yet: the base model
    asyncio.run(served.publish(version_state(lora_model)))
    asyncio.run(served.publish(version_state(lora_model)))
    expected = "safactory-v000002" if kind == "vllm" else f"{BASE}:safactory-v000002"
    assert weights.served_model(2) == expected == served.endpoint.model
    assert weights.served_model(1) != expected and weights.served_model(7) is None

    setup = WorkerSetup(
        policy=EndpointPolicyFactory(f"openai:{url}/v1#{BASE}"),
        envs={},
        store=StoreTarget(f"sqlite:///{tmp_path / 'store.db'}", redact=False),
        limits=EpisodeLimits(),
        run_id="r",
    )
    worker = RolloutWorker(setup, 0)
    task = Task(id="t", env_id="arith", split="train", prompt="p")
    job = GroupJob("arith", task, "g", 1, SamplingParams(), version=2, model=weights.served_model(2))
    asyncio.run(worker._catch_up(job))
    assert worker.policy.version == 2 and worker.policy.model == expected
