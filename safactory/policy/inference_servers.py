"""Publish new policy versions to real inference servers: vLLM and SGLang, over their HTTP APIs.

Each publisher first writes the version to disk with a `DiskPublisher` (`root/v<version>`), then
asks the server to serve it. A LoRA model (a peft `PeftModel`) saves only its adapter there
(`adapter_config.json` + `adapter_model.safetensors`), which is what the LoRA routes load; a plain
model saves a full HF directory (`config.json` + `*.safetensors`), which the weight routes load.

LoRA versions are loaded under a new adapter name per version (`safactory-v000003`), and only once
the server has loaded it is the previous adapter unloaded: a failed publish leaves the old version
serving. Full weights are reloaded in place from the directory. Any HTTP error, refusal
(`success: false`), timeout or unreachable server raises `PublishError` naming the server and the
version, and leaves `publisher.version` as it was. `served_model(version)` is the `model` that
OpenAI requests must name to reach that version. The server reads the directory itself, so
`disk.root` must be a path the server sees too (the same machine or a shared mount), and the
directory of the version being served must stay there: vLLM reloads an evicted adapter from it.

vLLM (followed: the source of vLLM 0.33.0, the newest release on PyPI, and the docs at
https://docs.vllm.ai/en/latest/features/lora/ section "Dynamically serving LoRA Adapters"):

* LoRA: `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter`
  `{"lora_name"}` (vllm/entrypoints/serve/lora/). Success is HTTP 200 with a plain-text body
  ("Success: LoRA adapter '...' added successfully."); errors are `{"error": {"message", "type",
  "code"}}` with code 400 or 404. Requests then use `model=<lora_name>`. The server needs
  `--enable-lora`, `--max-lora-rank` at least the adapter's rank (default 16), ideally
  `--max-loras 2` (old and new adapters side by side during the switch), and the environment
  variable `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` (without it the routes do not exist: HTTP 404).
* Full weights: vLLM documents no HTTP route that reloads weights from disk; its documented
  weight sync (https://docs.vllm.ai/en/latest/training/weight_transfer/) moves tensors over NCCL
  or CUDA IPC from a trainer on a GPU. What exists is the development-mode route
  `POST /collective_rpc` (vllm/entrypoints/serve/dev/rpc/api_router.py), which calls a worker
  method on every worker; we call `{"method": "reload_weights", "kwargs": {"weights_path": <dir>,
  "is_checkpoint_format": true}}` (`GPUModelRunner.reload_weights` in vllm/v1/worker/, which
  reloads in place from that directory), then `POST /reset_prefix_cache`
  (vllm/entrypoints/serve/dev/cache/api_router.py) so no KV computed with the old weights is
  reused. Both routes exist only with `VLLM_SERVER_DEV_MODE=1`, are not covered by `--api-key`,
  and are marked "should NOT be used in production" by vLLM. Requests keep using the served base
  model name (`--served-model-name`). The new weights must have the served architecture and shapes.

SGLang (followed: the source of SGLang 0.5.23, the newest release on PyPI, and the docs at
https://docs.sglang.io/docs/advanced_features/sglang_for_rl ("Update Weights from Disk") and
https://docs.sglang.io/docs/advanced_features/lora ("Dynamic LoRA loading", "OpenAI-compatible
API usage")):

* Full weights: `POST /update_weights_from_disk` `{"model_path", "weight_version"}` (we also name
  the version as SGLang's `weight_version` label; `flush_cache` defaults to true). The answer is
  `{"success", "message", "num_paused_requests"}`, HTTP 200 on success and 400 with
  `success: false` on failure. No server flag is needed. Requests keep the served model name.
* LoRA: `POST /load_lora_adapter` `{"lora_name", "lora_path"}` and `POST /unload_lora_adapter`
  `{"lora_name"}`; the answer is `{"success", "error_message", "loaded_adapters"}` (400 when
  `success` is false). OpenAI requests name the adapter as `model="<served model>:<lora_name>"`.
  The server needs `--enable-lora`, and since adapters arrive after start-up, `--max-lora-rank`
  and `--lora-target-modules` covering the adapter (e.g. `q_proj v_proj`, or `all`);
  `--max-loras-per-batch` of at least 2 keeps both versions resident during the switch.
* A body that fails validation (a missing field) is answered 400 in this version. The admin
  routes take `Authorization: Bearer <key>`: the `--admin-api-key` if the server has one,
  otherwise its `--api-key`.

Spec strings for `publisher_for`: `vllm:<base_url>` or `sglang:<base_url>`; a base URL ending in
`/v1` is taken to its server root.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from transformers import PreTrainedModel

from safactory.policy.publish import DiskPublisher, PublishError

log = logging.getLogger(__name__)

DEFAULT_ADAPTER_PREFIX = "safactory"


class ServerRefused(PublishError):
    """The server answered a publish request with an error (`status` is its HTTP status)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InferenceServerPublisher:
    """Shared flow: write to disk, check the directory, then the server-specific load calls."""

    kind = "inference"
    load_lora_route = ""
    unload_lora_route = ""

    def __init__(
        self,
        base_url: str,
        disk: DiskPublisher,
        *,
        model_name: str,
        lora: bool,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        version: int | None = None,
        adapter_prefix: str = DEFAULT_ADAPTER_PREFIX,
    ) -> None:
        """`model_name` is the server's served base model name; `version` the one it serves now
        (for LoRA: the version whose adapter is loaded, None when none is)."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.base_url = server_root(base_url)
        self.disk = disk
        self.model_name = model_name
        self.lora = lora
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.version = version
        self.adapter_prefix = adapter_prefix
        self._unload_pending: list[str] = []  # adapters whose unload failed once; retried next publish
        self._lock = asyncio.Lock()

    # ---- names ---------------------------------------------------------------------------
    def adapter_name(self, version: int) -> str:
        return f"{self.adapter_prefix}-v{version:06d}"

    def served_model(self, version: int | None = None) -> str:
        """The `model` OpenAI requests must name for `version` (default: the one serving now)."""
        if not self.lora:
            return self.model_name
        target = self.version if version is None else version
        if target is None:
            raise ValueError(f"no LoRA version has been published to {self.base_url} yet")
        return self._lora_model(self.adapter_name(target))

    def _lora_model(self, adapter: str) -> str:
        return adapter

    # ---- publishing ----------------------------------------------------------------------
    async def publish(self, model: PreTrainedModel, version: int) -> int:
        """Write `version` to disk and have the server serve it; returns `version`."""
        async with self._lock:
            self._refuse_served(version)
            await write_version(self.disk, model, version)
            await self._load(version)
            return version

    async def load(self, version: int) -> int:
        """Have the server serve `version`, which is on disk already (written through this publisher's
        `disk`, e.g. once for several servers: `ServerGroupPublisher`); returns `version`."""
        async with self._lock:
            self._refuse_served(version)
            await self._load(version)
            return version

    def _refuse_served(self, version: int) -> None:
        if self.lora and version == self.version:
            raise PublishError(
                f"v{version} is already served by {self.kind} server {self.base_url} as adapter "
                f"{self.adapter_name(version)!r}; publish a new version number"
            )

    async def _load(self, version: int) -> None:
        path = self.disk.path(version)
        self._check_directory(path, version)
        async with self._client() as client:
            if self.lora:
                await self._publish_lora(client, path, version)
            else:
                await self._load_full(client, path, version)
        self.version = version

    def _check_directory(self, path: Path, version: int) -> None:
        """Refuse before calling the server when the saved directory is the wrong kind."""
        has_adapter = (path / "adapter_config.json").is_file()
        if self.lora and not has_adapter:
            raise PublishError(
                f"v{version} at {path} is not a LoRA adapter (no adapter_config.json): a LoRA publisher "
                "needs the peft model, or use lora=False for full weights"
            )
        if not self.lora and (
            has_adapter or not (path / "config.json").is_file() or not any(path.glob("*.safetensors"))
        ):
            raise PublishError(
                f"v{version} at {path} is not a full model directory (config.json + *.safetensors): a "
                "full-weights publisher cannot load a LoRA adapter; use lora=True or merge the adapter"
            )

    async def _publish_lora(self, client: httpx.AsyncClient, path: Path, version: int) -> None:
        new = self.adapter_name(version)
        await self._post(client, self.load_lora_route, {"lora_name": new, "lora_path": str(path)}, version)
        # The new adapter serves now; only then let the old ones go.
        retries = [name for name in self._unload_pending if name != new]
        old = [self.adapter_name(self.version)] if self.version is not None else []
        self._unload_pending = []
        for name in old + retries:
            try:
                await self._post(client, self.unload_lora_route, {"lora_name": name}, version)
            except PublishError as exc:
                if name in retries or (isinstance(exc, ServerRefused) and exc.status == 404):
                    log.warning("giving up unloading adapter %r from %s: %s", name, self.base_url, exc)
                else:
                    log.warning(
                        "v%d serves, but adapter %r stays loaded (retried next publish): %s", version, name, exc
                    )
                    self._unload_pending.append(name)

    async def _load_full(self, client: httpx.AsyncClient, path: Path, version: int) -> None:
        raise NotImplementedError

    # ---- HTTP ----------------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout_s)

    async def _post(self, client: httpx.AsyncClient, route: str, body: dict[str, Any] | None, version: int) -> Any:
        """POST `body` as JSON; the decoded answer (JSON or text), or a PublishError that says why not."""
        where = f"{self.kind} server {self.base_url}"
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await client.post(route, json=body) if body is not None else await client.post(route)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise PublishError(f"{where} did not answer POST {route} for v{version} within {self.timeout_s} s") from exc
        except httpx.HTTPError as exc:
            raise PublishError(f"{where} is unreachable (POST {route} for v{version}): {exc!r}") from exc
        data = _decode(response)
        if not response.is_success:
            raise ServerRefused(
                f"{where} refused v{version}: POST {route} answered HTTP {response.status_code}: {_detail(data)}",
                response.status_code,
            )
        if isinstance(data, dict) and data.get("success") is False:
            raise ServerRefused(
                f"{where} refused v{version}: POST {route} answered success=false: {_detail(data)}",
                response.status_code,
            )
        return data


class VLLMPublisher(InferenceServerPublisher):
    """vLLM's OpenAI server: dynamic LoRA routes, or (dev mode) an in-place reload from disk."""

    kind = "vLLM"
    load_lora_route = "/v1/load_lora_adapter"
    unload_lora_route = "/v1/unload_lora_adapter"

    async def _load_full(self, client: httpx.AsyncClient, path: Path, version: int) -> None:
        body = {
            "method": "reload_weights",
            "kwargs": {"weights_path": str(path), "is_checkpoint_format": True},
            "timeout": self.timeout_s,
        }
        await self._post(client, "/collective_rpc", body, version)
        try:  # the weights serve already; a stale prefix cache only costs cache hits computed with old weights
            await self._post(client, "/reset_prefix_cache", None, version)
        except PublishError as exc:
            log.warning("v%d loaded, but the prefix cache was not reset: %s", version, exc)


class SGLangPublisher(InferenceServerPublisher):
    """SGLang's server: `/update_weights_from_disk`, or its dynamic LoRA routes."""

    kind = "SGLang"
    load_lora_route = "/load_lora_adapter"
    unload_lora_route = "/unload_lora_adapter"

    def _lora_model(self, adapter: str) -> str:
        return f"{self.model_name}:{adapter}"

    async def _load_full(self, client: httpx.AsyncClient, path: Path, version: int) -> None:
        await self._post(
            client, "/update_weights_from_disk", {"model_path": str(path), "weight_version": str(version)}, version
        )


async def write_version(disk: DiskPublisher, model: PreTrainedModel, version: int) -> None:
    try:
        await disk.publish(model, version)
    except OSError as exc:
        raise PublishError(f"could not write v{version} to {disk.path(version)}: {exc}") from exc


class ServerGroupPublisher:
    """One model on several vLLM or SGLang servers: each version is written to disk once and loaded by every
    server at once. A server that fails to load it is reported (`publish`'s result), not fatal, unless all
    fail; the caller takes it out of routing until a later version loads there."""

    def __init__(self, publishers: list[VLLMPublisher | SGLangPublisher]) -> None:
        if not publishers or len({id(p.disk) for p in publishers}) != 1:
            raise ValueError("a server group needs publishers that share one DiskPublisher")
        self.publishers = publishers
        self.disk = publishers[0].disk

    def served_model(self, version: int | None = None) -> str:
        return self.publishers[0].served_model(version)  # the same name on every server of the group

    async def publish(self, model: PreTrainedModel, version: int) -> list[BaseException | None]:
        """Write `version` once, have every server load it; per server, None or why it failed."""
        await write_version(self.disk, model, version)
        results = await asyncio.gather(*(p.load(version) for p in self.publishers), return_exceptions=True)
        errors = [r if isinstance(r, BaseException) else None for r in results]
        if all(e is not None for e in errors):
            first = errors[0]
            raise PublishError(f"no server of the group loaded v{version}: {first}") from first
        return errors


def publisher_for(
    spec: str,
    disk: DiskPublisher,
    *,
    model_name: str,
    lora: bool,
    api_key: str | None = None,
    timeout_s: float = 300.0,
    version: int | None = None,
) -> VLLMPublisher | SGLangPublisher:
    """`vllm:<base_url>` or `sglang:<base_url>` -> the publisher for that server."""
    kind, sep, url = spec.partition(":")
    classes: dict[str, type[VLLMPublisher] | type[SGLangPublisher]] = {"vllm": VLLMPublisher, "sglang": SGLangPublisher}
    if not sep or kind not in classes:
        raise ValueError(f"publisher spec {spec!r} must look like 'vllm:<base_url>' or 'sglang:<base_url>'")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"publisher spec {spec!r}: {url!r} is not an http(s) URL")
    return classes[kind](
        url, disk, model_name=model_name, lora=lora, api_key=api_key, timeout_s=timeout_s, version=version
    )


def server_root(base_url: str) -> str:
    """`http://host:8000/v1/` -> `http://host:8000`: these routes live at the server root (vLLM's
    LoRA routes carry their own `/v1`)."""
    url = base_url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def _decode(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text


def _detail(data: Any) -> str:
    """The human part of an error answer: vLLM/OpenAI `error.message`, SGLang `message` or
    `error_message`, FastAPI `detail`; else the body itself."""
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        for key in ("error_message", "message", "detail"):
            if data.get(key):
                return str(data[key])[:500]
    text = data if isinstance(data, str) else json.dumps(data)
    return text.strip()[:500] or "(empty body)"


__all__ = [
    "InferenceServerPublisher",
    "SGLangPublisher",
    "ServerRefused",
    "VLLMPublisher",
    "publisher_for",
    "server_root",
]
