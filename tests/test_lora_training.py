"""LoRA in the trainer: RL steps move only the adapter, the KL reference is the base with the adapter off,
a version is the adapter alone, it hot-swaps into a running policy and its checkpoint reloads."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from safactory.evolve.checkpoint import load_checkpoint, save_checkpoint
from safactory.evolve.experience import TrainSequence
from safactory.evolve.trainer import Trainer
from safactory.policy.base import SamplingParams
from safactory.policy.chat import TemplateChat
from safactory.policy.local import LocalPolicy
from safactory.policy.models import add_lora
from safactory.policy.weights import load_version_state, version_state
from safactory.types import Message
from tests.real_tokenizers import random_llama, smollm2_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def lora_model(tokenizer):
    return add_lora(random_llama(tokenizer, seed=3), r=4, alpha=8)


def rl_batch(tokenizer, n: int = 4) -> list[TrainSequence]:
    seqs = []
    for i in range(n):
        ids = tokenizer.encode(f"<|im_start|>user\nsay {i}<|im_end|>\n<|im_start|>assistant\nanswer {i}<|im_end|>")
        mask = [0] * (len(ids) - 4) + [1] * 4
        seqs.append(TrainSequence(ids, mask, [-2.0] * len(ids), advantage=1.0 if i % 2 else -1.0))
    return seqs


def test_rl_steps_move_only_the_adapter(tokenizer):
    model = lora_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, lr=1e-2)
    for _ in range(2):
        stats = trainer.train_step(rl_batch(tokenizer), "ppo")
    assert stats["grad_norm"] > 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)  # B starts at zero: the adapter now does something
    version = trainer.weights()
    assert set(version) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in k for k in version)


def test_the_kl_reference_of_a_lora_model_is_its_base(tokenizer):
    model = lora_model(tokenizer)
    base = copy.deepcopy(model.get_base_model())  # only for the check: the trainer keeps no copy
    trainer = Trainer(model, lr=5e-2)
    trainer.train_step(rl_batch(tokenizer), "ppo")  # the adapter moves away from the base
    trainer.use_base_as_reference()
    trainer.kl_coef = 1.0
    batch = trainer._collate(rl_batch(tokenizer))
    with torch.no_grad():
        reference = trainer._reference_logprobs(batch)
        expected = trainer.sequence_logprobs(batch, use_temperature=True, model=base)
        current = trainer.sequence_logprobs(batch, use_temperature=True)
    assert torch.allclose(reference, expected, atol=1e-5)
    assert not torch.allclose(current, expected, atol=1e-4)  # the adapter is back on afterwards
    assert trainer.train_step(rl_batch(tokenizer), "ppo")["kl_ref"] > 0


def test_a_lora_version_hot_swaps_into_the_running_policy(tokenizer):
    model = lora_model(tokenizer)
    chat = TemplateChat(tokenizer, [model.config.eos_token_id])
    policy = LocalPolicy(copy.deepcopy(model), chat, seed=0)
    trainer = Trainer(model, lr=5e-2)
    trainer.train_step(rl_batch(tokenizer), "ppo")
    base_before = {k: v.clone() for k, v in policy.model.state_dict().items() if "lora_" not in k}
    assert policy.load_weights(trainer.weights()) == 1
    assert all(torch.equal(v, policy.model.state_dict()[k]) for k, v in base_before.items())  # base untouched

    async def sample():
        messages = [Message(role="user", content="Hi")]
        return await policy.generate(messages, [], SamplingParams(temperature=1.0, max_tokens=6))

    completion = asyncio.run(sample())
    ids = completion.prompt_ids + completion.token_ids
    scored = asyncio.run(policy.score(ids))  # the policy's own forward pass
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert scored[1:] == pytest.approx(expected.tolist(), abs=1e-4)  # it runs the trained adapter
    with pytest.raises(RuntimeError, match="not in this model"):
        load_version_state(policy.model, {"nonsense.weight": torch.zeros(1)})


def test_a_lora_checkpoint_holds_the_adapter_and_reloads(tokenizer, tmp_path):
    model = lora_model(tokenizer)
    trainer = Trainer(model, lr=5e-2)
    trainer.train_step(rl_batch(tokenizer), "ppo")
    path = save_checkpoint(
        tmp_path,
        model=model,
        tokenizer=tokenizer,
        optimizer=trainer.optimizer,
        version=3,
        parent_version=2,
        train_step=1,
    )
    assert (path / "adapter_model.safetensors").is_file() and not (path / "model.safetensors").exists()
    fresh = lora_model(tokenizer)
    _, meta = load_checkpoint(path, fresh)
    assert meta.version == 3
    trained, loaded = version_state(model), version_state(fresh)
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)


def test_a_lora_policy_batches_continuously(tokenizer):
    model = lora_model(tokenizer)
    policy = LocalPolicy(model, TemplateChat(tokenizer, [model.config.eos_token_id]), seed=0)
    assert policy.continuous and policy._logits_to_keep


def test_gradient_checkpointing_gives_the_same_update(tokenizer):
    """model.gradient_checkpointing recomputes activations in the backward pass: same loss, same gradients."""
    plain = lora_model(tokenizer)
    checkpointed = copy.deepcopy(plain)  # the same weights (LoRA's A matrices are drawn at random)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stats = [Trainer(m, lr=1e-2).train_step(rl_batch(tokenizer), "ppo") for m in (plain, checkpointed)]
    assert stats[0]["loss"] == pytest.approx(stats[1]["loss"], abs=1e-6)
    assert stats[0]["grad_norm"] == pytest.approx(stats[1]["grad_norm"], rel=1e-4)
    assert checkpointed.is_gradient_checkpointing
