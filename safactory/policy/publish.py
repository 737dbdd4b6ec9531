"""Hand a new policy version to the rollout side: in-process hot swap, to disk, or to an endpoint.

Every publish has a timeout and a clear error; a failed publish leaves the old
version serving (the local policy swaps under a lock only after the new weights
loaded; our server checks new weights before it swaps).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from safactory.policy.hf_export import save_tokenizer


class PublishError(RuntimeError):
    """A new version could not be published; the previous one keeps serving."""


class Publisher(Protocol):
    async def publish(self, model: PreTrainedModel, version: int) -> int: ...


class InProcessPublisher:
    """Hot swap into a LocalPolicy in the same process."""

    def __init__(self, policy: Any, timeout_s: float = 120.0) -> None:
        self.policy = policy
        self.timeout_s = timeout_s

    async def publish(self, model: PreTrainedModel, version: int) -> int:
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            return int(await asyncio.wait_for(self.policy.publish(weights, version), self.timeout_s))
        except TimeoutError as exc:
            raise PublishError(f"hot swap to v{version} did not finish within {self.timeout_s} s") from exc


class DiskPublisher:
    """Write each version to `root/v<version>` (atomically), for servers that load from disk."""

    def __init__(self, root: Path, tokenizer: Any) -> None:
        self.root = root
        self.tokenizer = tokenizer

    def path(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    async def publish(self, model: PreTrainedModel, version: int) -> int:
        await asyncio.to_thread(self._write, model, version)
        return version

    def _write(self, model: PreTrainedModel, version: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-v{version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.no_grad():
            model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(self.tokenizer, tmp)  # a tiny one also as tokenizer.json + chat template (hf_export)
        final = self.path(version)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)


class EndpointPublisher:
    """Write to disk, then ask an OpenAI-compatible server of ours to load it (POST /v1/load_weights)."""

    def __init__(self, endpoint: Any, disk: DiskPublisher, timeout_s: float = 300.0) -> None:
        self.endpoint = endpoint
        self.disk = disk
        self.timeout_s = timeout_s

    async def publish(self, model: PreTrainedModel, version: int) -> int:
        await self.disk.publish(model, version)
        try:
            await asyncio.wait_for(self.endpoint.load_weights(str(self.disk.path(version)), version), self.timeout_s)
        except TimeoutError as exc:
            raise PublishError(f"endpoint did not load v{version} within {self.timeout_s} s") from exc
        except Exception as exc:
            raise PublishError(f"endpoint refused v{version}: {exc}") from exc
        return version
