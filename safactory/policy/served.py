"""The rollout side on an OpenAI-compatible endpoint: generation there, new versions published to it.

`ServedPolicy` lets the closed loop run its rollouts and evaluations against a server
instead of an in-process model: `safactory serve-policy` (or any server that speaks the same
`/v1/load_weights` call), vLLM or SGLang. The trainer keeps its own copy of the weights;
each new version is written to `publish_dir/v<version>` and the server is asked to load
it (`safactory.policy.publish.EndpointPublisher` for ours; a `VLLMPublisher` or
`SGLangPublisher` from `safactory.policy.inference_servers` for theirs, after which requests
name the model that serves the new version), so episodes carry the version the server
reports. A LoRA model publishes its adapter alone to vLLM and SGLang, and merged into its
base to our server. Only the newest `keep` published directories are kept on disk.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from safactory.policy.base import Completion, SamplingParams
from safactory.policy.endpoint import EndpointPolicy
from safactory.policy.inference_servers import ServerGroupPublisher, publisher_for
from safactory.policy.models import merge_lora
from safactory.policy.publish import DiskPublisher, EndpointPublisher
from safactory.policy.routing import RoutedPolicy
from safactory.policy.weights import is_adapter_model, load_version_state
from safactory.types import Message, ToolSpec


class ServedPolicy:
    def __init__(
        self,
        endpoint: EndpointPolicy | RoutedPolicy,
        model: PreTrainedModel,
        tokenizer: Any,
        publish_dir: Path,
        *,
        version: int = 0,
        keep: int = 2,
        server: str = "safactory",
        api_key: str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.endpoint.version = version
        self.model = copy.deepcopy(model).eval()  # the weights last published
        self.disk = DiskPublisher(publish_dir, tokenizer)
        self.publisher: Any
        if server == "safactory":
            self.publisher = EndpointPublisher(endpoint, self.disk)
        else:
            lora = is_adapter_model(self.model)
            urls = [s.client.base_url for s in endpoint.servers] if isinstance(endpoint, RoutedPolicy) else None
            publishers = [
                publisher_for(f"{server}:{url}", self.disk, model_name=endpoint.model, lora=lora, api_key=api_key)
                for url in urls or [endpoint.base_url]
            ]
            # several servers: each version written once, loaded by all (a server that fails leaves routing)
            self.publisher = ServerGroupPublisher(publishers) if urls else publishers[0]
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 2048))
        self.keep = keep
        # version -> the model name requests give for it (a vLLM/SGLang LoRA version is a model of its own);
        # Ray rollout workers follow it (factory/ray_rollouts.py)
        self.served_models: dict[int, str] = {version: endpoint.model}

    @property
    def version(self) -> int:
        return self.endpoint.version

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        return await self.endpoint.generate(messages, tools, sampling)

    async def publish(self, state_dict: dict[str, torch.Tensor], version: int | None = None) -> int:
        """Write the weights as the next version (default: current + 1) and have the server load them."""
        target = self.version + 1 if version is None else version
        load_version_state(self.model, state_dict)
        merge = is_adapter_model(self.model) and isinstance(self.publisher, EndpointPublisher)
        result = await self.publisher.publish(merge_lora(copy.deepcopy(self.model)) if merge else self.model, target)
        if hasattr(self.publisher, "served_model"):  # vLLM / SGLang: a LoRA version is a model name of its own
            self.endpoint.model = self.publisher.served_model(target)
        if isinstance(self.publisher, ServerGroupPublisher):
            assert isinstance(self.endpoint, RoutedPolicy)
            self.endpoint.loaded(target, result)
        self.endpoint.version = target
        self.served_models = {v: m for v, m in self.served_models.items() if v > target - 8}
        self.served_models[target] = self.endpoint.model
        for old in sorted(self.disk.root.glob("v*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    async def close(self) -> None:
        await self.endpoint.close()
