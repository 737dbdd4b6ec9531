"""The prefix cache of LocalPolicy: a later turn reuses the keys and values of the conversation so far, exactly."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from safactory.policy.base import SamplingParams
from safactory.policy.local import LocalPolicy
from safactory.policy.prefix_cache import PrefixCache
from tests.conftest import perturbed
from tests.test_continuous_batching import forward_logprobs, make_policy


async def conversation(policy: LocalPolicy, start: list[int], turns: int, sampling: SamplingParams, seed: int):
    """`turns` turns; each re-sends everything so far plus a few new "observation" ids, as an episode does."""
    rng = random.Random(seed)
    prompt, completions = list(start), []
    for _ in range(turns):
        completion = await policy.generate_ids(prompt, sampling)
        completions.append(completion)
        prompt = prompt + completion.token_ids + [rng.randrange(4, 40) for _ in range(rng.randint(1, 9))]
    return completions


def test_a_later_turn_reuses_the_conversation_and_decodes_the_same(sharp):
    cached, plain = make_policy(sharp), make_policy(sharp, prefix_cache_mb=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    start = list(range(5, 45))

    a = asyncio.run(conversation(cached, start, 4, greedy, seed=0))
    b = asyncio.run(conversation(plain, start, 4, greedy, seed=0))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    for x, y in zip(a, b, strict=True):
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)) < 1e-4
    stats = cached.prefix_cache.stats
    assert stats.lookups == 4 and stats.hits == 3  # turns 2..4 found the turn before
    # each later turn fed only what followed the previous turn's prompt and reply (its last token was never fed)
    assert stats.reused_tokens == sum(len(c.prompt_ids) + len(c.token_ids) - 1 for c in a[:-1])
    assert plain.prefix_cache is None


def test_many_conversations_at_once_sample_with_exact_logprobs(sharp):
    """Staggered multi-turn episodes joining with and without cached starts: every log-prob is the model's."""
    policy = make_policy(sharp)
    warm = SamplingParams(temperature=0.8, max_tokens=10)

    async def go():
        return await asyncio.gather(
            *(conversation(policy, [7 + i, *range(10, 30 + 3 * i)], 3, warm, seed=i) for i in range(12))
        )

    episodes = asyncio.run(go())
    assert policy.prefix_cache.stats.hits >= 12
    for episode in episodes:
        for c in episode:
            expected = forward_logprobs(policy.model, c.prompt_ids, c.token_ids, 0.8)
            assert max(abs(a - b) for a, b in zip(c.logprobs, expected, strict=True)) < 1e-4


def test_new_weights_clear_the_cache(sharp):
    policy = make_policy(sharp)
    other = perturbed(sharp[0])
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    prompt = list(range(5, 60))
    first = asyncio.run(policy.generate_ids(prompt, greedy))
    assert len(policy.prefix_cache) == 1
    policy.load_weights(other.state_dict())
    assert len(policy.prefix_cache) == 0
    again = asyncio.run(policy.generate_ids(prompt + first.token_ids + [9], greedy))
    assert policy.prefix_cache.stats.hits == 0  # nothing computed by the old weights was reused
    expected = forward_logprobs(other, again.prompt_ids, again.token_ids, 1.0)
    assert max(abs(a - b) for a, b in zip(again.logprobs, expected, strict=True)) < 1e-4


def kv(n: int, fill: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [torch.full((2, n, 4), fill)], [torch.full((2, n, 4), -fill)]


def test_lookup_takes_the_longest_cached_start_and_eviction_leaves_the_rest_findable():
    entry_bytes = 2 * 2 * 64 * 4 * 4  # keys and values of 64 tokens
    cache = PrefixCache(max_bytes=2 * entry_bytes + 1, block=16)
    x, y, z = list(range(100, 132)), list(range(200, 232)), [1, 2, 3]
    cache.store(x + y, *kv(64, 1.0))  # B
    cache.store(x + [7] * 32, *kv(64, 2.0))  # A: shares x with B, so x's blocks now point to A
    hit = cache.lookup(x + y + z)
    assert hit is not None and hit.length == 64 and float(hit.keys[0][0, 0, 0]) == 1.0  # B: the deeper match
    hit = cache.lookup(x + [7] * 5 + [8])
    assert hit is not None and hit.length == 37 and float(hit.keys[0][0, 0, 0]) == 2.0  # A, extended past a block
    assert cache.lookup(x + y) is not None and cache.lookup(x + y).length == 63  # one prompt token is always fed
    assert cache.lookup(list(range(100, 110)) + [5] * 20) is None  # under one block in common
    cache.lookup(x + y + z)  # B is now the most recently used
    cache.store([5] * 64, *kv(64, 3.0))  # over budget: A (least recent) leaves, taking x's block keys with it
    assert len(cache) == 2 and cache.stats.evicted == 1
    hit = cache.lookup(x + y + z)
    assert hit is not None and hit.length == 64  # B is still found by its deeper blocks
    with pytest.raises(ValueError, match="one entry per token"):
        cache.store(x, *kv(5, 1.0))
