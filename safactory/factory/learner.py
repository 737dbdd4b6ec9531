"""A learner: one model being improved online, with the policy serving its rollouts and its versions.

The run's main policy is one learner; a distillation student is another. Each has its
own trainer, policy (in-process, or a served endpoint the weights are published to),
one rollout runner per env, checkpoints and deployed version. Every version a learner
publishes is registered in the store with its weights hash and parent.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from safactory.evolve.trainer import Trainer
from safactory.factory.context import RunContext
from safactory.policy.chat import ChatRenderer
from safactory.policy.local import LocalPolicy
from safactory.policy.models import PolicyModel, merge_lora, save_adapter, save_model
from safactory.policy.routing import endpoint_from_spec
from safactory.policy.served import ServedPolicy
from safactory.policy.weights import is_adapter_model, version_state
from safactory.provenance import weights_hash
from safactory.sim.runner import RolloutRunner


@dataclass
class Learner:
    """A model being improved online: trainer, the policy serving its rollouts, runners, gate state.

    `phase_prefix` names its held-out evaluations in the summary ("" for the main policy,
    "student:" for a student) and `warm_start_key` its warm-start summary entry."""

    name: str
    run_id: str
    trainer: Trainer
    policy: LocalPolicy | ServedPolicy
    tokenizer: Any  # the chat renderer's `ChatTokenizer`
    chat: ChatRenderer
    runners: dict[str, RolloutRunner]
    checkpoints: Path
    base: str = "tiny"  # the model spec it started from (a LoRA adapter's base)
    phase_prefix: str = ""
    warm_start_key: str = "sft"
    weights_hashes: dict[int, str] = field(default_factory=dict)
    deployed: dict[str, Any] = field(default_factory=dict)  # version, metrics, checkpoint (dir name)
    versions_stored: bool = False  # the store already holds versions of this learner (a resumed run)

    @property
    def consumer(self) -> str:
        """The name its consumption of stored trajectories is recorded under."""
        return self.run_id

    def phase_key(self, label: str) -> str:
        return f"{self.phase_prefix}{label}"


def make_learner(
    ctx: RunContext,
    name: str,
    run_id: str,
    start: PolicyModel,
    lr: float,
    *,
    main: bool,
) -> Learner:
    """A learner for the model `start`, its policy continuing the version numbers the store already holds."""
    model = start.model.to(ctx.config.model.torch_device())
    chat = start.chat
    tokenizer = chat.tokenizer
    stored = [c["version"] for c in ctx.store.checkpoints(run_id)]
    version = max(stored) if stored else 0  # after a crash the next publish gets a new number
    learner = Learner(
        name=name,
        run_id=run_id,
        trainer=Trainer(model, lr=lr, pad_id=tokenizer.pad_id),
        policy=_policy(ctx, name, model, tokenizer, chat, version),
        tokenizer=tokenizer,
        chat=chat,
        base=start.source,
        runners={},
        checkpoints=ctx.out / "checkpoints" / name,
        phase_prefix="" if main else f"{name}:",
        warm_start_key="sft" if main else f"{name}_warm_start",
        versions_stored=bool(stored),
    )
    rollout = ctx.config.rollout
    learner.runners = {
        env.name: RolloutRunner(
            env.entry.factory,
            learner.policy,
            limits=ctx.limits,
            concurrency=rollout.concurrency,
            run_id=run_id,
            seed=ctx.config.seed,
            provenance=lambda: provenance(ctx, learner),
        )
        for env in ctx.envs.values()
    }
    if run_id not in ctx.store.run_ids():
        ctx.store.create_run(run_id, ctx.config.model_dump(mode="json"), ctx.code_version)
    return learner


def _policy(
    ctx: RunContext, name: str, model: PreTrainedModel, tokenizer: Any, chat: ChatRenderer, version: int
) -> LocalPolicy | ServedPolicy:
    """The policy serving a learner's rollouts: in-process, or the configured endpoint."""
    rollout = ctx.config.rollout
    if rollout.endpoint:
        key = os.environ.get(rollout.endpoint_api_key_env) if rollout.endpoint_api_key_env else None
        endpoint = endpoint_from_spec(rollout.endpoint, api_key=key)  # several servers: routed (policy/routing.py)
        publish_dir = (ctx.out / "published" / name).resolve()  # the server reads it: an absolute path
        return ServedPolicy(
            endpoint, model, tokenizer, publish_dir, version=version, server=rollout.server, api_key=key
        )
    return LocalPolicy(
        copy.deepcopy(model),
        chat,
        max_batch=rollout.max_batch,
        seed=ctx.config.seed,
        version=version,
        prefix_cache_mb=rollout.prefix_cache_mb,
    )


def provenance(ctx: RunContext, learner: Learner) -> dict[str, Any]:
    """Stamped on every trajectory at episode start."""
    version = learner.policy.version
    return {
        "config_hash": ctx.config_hash,
        "code_version": ctx.code_version,
        "policy_version_at_start": version,
        "weights_hash": learner.weights_hashes.get(version, ""),
        "redacted": ctx.config.redact,
    }


def record_version(ctx: RunContext, learner: Learner, state_dict: dict[str, torch.Tensor], parent: int | None) -> None:
    """Register the policy's current version (weights hash, parent, training step) in the store."""
    version = learner.policy.version
    learner.weights_hashes[version] = weights_hash(state_dict)
    ctx.store.add_checkpoint(
        learner.run_id,
        version,
        weights_hash=learner.weights_hashes[version],
        train_step=learner.trainer.step,
        parent_version=parent,
    )


async def register_start(ctx: RunContext, learner: Learner) -> None:
    """Register the learner's starting weights as a version; a new number if the run was resumed."""
    if learner.versions_stored or isinstance(learner.policy, ServedPolicy):
        # a new number after a crash; a server is always sent the starting weights first
        await publish(ctx, learner, parent=None)
    else:
        record_version(ctx, learner, version_state(learner.policy.model, copy=False), parent=None)


async def publish(ctx: RunContext, learner: Learner, parent: int | None = None) -> int:
    """Hot-swap the trainer's weights into the running policy as the next version."""
    weights = learner.trainer.weights()
    parent = learner.policy.version if parent is None else parent
    await learner.policy.publish(weights)
    record_version(ctx, learner, weights, parent)
    return learner.policy.version


def save_deployed(learner: Learner, out: Path) -> None:
    """Save the learner's current weights as a standard HF directory `out/model`; a LoRA learner's
    adapter is merged into a copy of its base there and also saved alone in `out/adapter`."""
    model = learner.trainer.model
    if is_adapter_model(model):
        save_adapter(model, out / "adapter", base=learner.base)
        model = merge_lora(copy.deepcopy(model))
    save_model(model, learner.tokenizer, out / "model")
