"""Continuous batching in LocalPolicy: joins at the next decode step, finished rows leave, hot swap mid-run.

The tiny model's default init is nearly uniform (greedy decoding repeats one
character), so these tests re-draw its matrices with a larger spread: greedy
continuations then differ per prompt and some end with <eos>.
"""

from __future__ import annotations

import asyncio
import copy
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safactory.evolve.losses import token_logprobs
from safactory.policy.base import Completion, PolicyError, SamplingParams
from safactory.policy.chat import PlainTextChat
from safactory.policy.local import LocalPolicy
from safactory.policy.slots import KVSlots
from safactory.types import Message
from tests.conftest import perturbed

PROMPTS = [[Message(role="user", content="Compute " + "12+3" * k + ".")] for k in range(1, 9)]
LENGTHS = [40, 7, 23, 3, 31, 12, 17, 5]


def make_policy(sharp, **kwargs) -> LocalPolicy:
    return LocalPolicy(copy.deepcopy(sharp[0]), PlainTextChat(sharp[1]), seed=0, **kwargs)


async def until_steps(policy: LocalPolicy, n: int) -> None:
    """Wait (by polling, no timing assumptions) until the engine has run `n` decode steps."""
    for _ in range(100_000):
        if policy.decode_steps >= n:
            return
        await asyncio.sleep(0.0005)
    raise AssertionError(f"the engine never reached {n} decode steps")


async def staggered(policy: LocalPolicy, sampling: list[SamplingParams], gaps: list[int]) -> list[Completion]:
    """Submit PROMPTS[i] after the engine ran `gaps[i]` more decode steps than at the previous submission."""
    tasks: list[asyncio.Task[Completion]] = []
    for i, (s, gap) in enumerate(zip(sampling, gaps, strict=True)):
        await until_steps(policy, policy.decode_steps + gap)
        tasks.append(asyncio.create_task(policy.generate(PROMPTS[i], [], s)))
        await asyncio.sleep(0)
    return list(await asyncio.gather(*tasks))


def forward_logprobs(model, prompt_ids, completion_ids, temperature):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    lp = token_logprobs(logits[:, :-1], ids[:, 1:], torch.tensor([temperature]))
    return lp[0, len(prompt_ids) - 1 :].tolist()


def test_staggered_greedy_equals_unbatched(sharp):
    policy = make_policy(sharp)
    sampling = [SamplingParams(temperature=0.0, max_tokens=n) for n in LENGTHS]
    gaps = [0, 2, 0, 3, 1, 5, 0, 2]

    async def go():
        joined = await staggered(policy, sampling, gaps)
        alone = [await policy.generate(p, [], s) for p, s in zip(PROMPTS, sampling, strict=True)]
        return joined, alone

    joined, alone = asyncio.run(go())
    assert [c.token_ids for c in joined] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in alone}) == len(PROMPTS)  # the test model is not degenerate
    assert any(c.finish_reason == "stop" for c in alone) and any(c.finish_reason == "length" for c in alone)
    # requests really overlapped: some steps decoded several rows while others joined
    assert any(r.decoded >= 2 and r.joined >= 1 for r in policy.step_log)


def test_logprobs_match_a_forward_pass_across_joins_and_leaves(sharp):
    policy = make_policy(sharp)
    sampling = [SamplingParams(temperature=0.7, max_tokens=n) for n in LENGTHS]
    sampling[2] = SamplingParams(temperature=1.3, top_p=1.0, max_tokens=LENGTHS[2])

    completions = asyncio.run(staggered(policy, sampling, [0, 1, 1, 2, 0, 3, 1, 1]))
    for c, s in zip(completions, sampling, strict=True):
        assert len(c.logprobs) == len(c.token_ids) and c.policy_versions == [0]
        expected = forward_logprobs(policy.model, c.prompt_ids, c.token_ids, s.temperature)
        assert max(abs(a - b) for a, b in zip(c.logprobs, expected, strict=True)) < 1e-4


def test_a_request_arriving_mid_run_joins_before_the_first_finishes(sharp):
    policy = make_policy(sharp)
    greedy = SamplingParams(temperature=0.0, max_tokens=40)

    async def go():
        first = asyncio.create_task(policy.generate(PROMPTS[0], [], greedy))
        await until_steps(policy, 4)
        assert not first.done()
        second = await policy.generate(PROMPTS[1], [], SamplingParams(temperature=0.0, max_tokens=3))
        still_running = not first.done()
        return await first, second, still_running

    first, second, still_running = asyncio.run(go())
    assert still_running  # the second request finished while the first was still decoding
    assert len(first.token_ids) == 40 and len(second.token_ids) == 3
    log = list(policy.step_log)
    join = next(r for r in log if r.joined == 1 and r.decoded == 1)  # joined the running batch of one
    assert join.running == 2
    last = log[-1]
    assert last.finished == 1 and last.running == 0 and last.step > join.step
    assert policy.batches == 1  # one busy period: the running batch never emptied


def test_finished_rows_leave_the_batch_and_stop_costing_compute(sharp):
    policy = make_policy(sharp)
    lengths = [2, 9, 30]

    async def go():
        return await asyncio.gather(
            *(
                policy.generate(PROMPTS[i], [], SamplingParams(temperature=1.0, max_tokens=n))
                for i, n in enumerate(lengths)
            )
        )

    completions = asyncio.run(go())
    log = list(policy.step_log)
    # every row computed exactly the tokens it returned: one prefill, then one decode row per token
    assert sum(r.decoded + r.joined for r in log) == sum(len(c.token_ids) for c in completions)
    assert [r.running for r in log] == sorted((r.running for r in log), reverse=True)
    assert log[-1].running == 0 and len(log) == max(len(c.token_ids) for c in completions)


def test_a_caller_that_gives_up_leaves_the_batch(sharp):
    policy = make_policy(sharp)
    greedy = SamplingParams(temperature=0.0, max_tokens=40)

    async def go():
        doomed = asyncio.create_task(policy.generate(PROMPTS[0], [], greedy))
        survivor = asyncio.create_task(policy.generate(PROMPTS[2], [], SamplingParams(temperature=0.0, max_tokens=30)))
        await until_steps(policy, 3)
        doomed.cancel()
        return await survivor

    survivor = asyncio.run(go())
    alone = asyncio.run(policy.generate(PROMPTS[2], [], SamplingParams(temperature=0.0, max_tokens=30)))
    assert survivor.token_ids == alone.token_ids
    log = list(policy.step_log)
    assert min(r.running for r in log[3:10]) == 1  # the cancelled row left at once


def test_max_batch_bounds_the_running_batch(sharp):
    policy = make_policy(sharp, max_batch=3)
    sampling = [SamplingParams(temperature=0.0, max_tokens=n) for n in LENGTHS]

    async def go():
        together = await asyncio.gather(*(policy.generate(p, [], s) for p, s in zip(PROMPTS, sampling, strict=True)))
        alone = [await policy.generate(p, [], s) for p, s in zip(PROMPTS, sampling, strict=True)]
        return together, alone

    together, alone = asyncio.run(go())
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert max(r.decoded + r.joined for r in policy.step_log) == 3


def test_weight_swap_mid_run_is_recorded_in_every_version_touched(sharp):
    policy = make_policy(sharp)
    other = perturbed(sharp[0])
    greedy = SamplingParams(temperature=0.0, max_tokens=40)

    async def go():
        spanning = asyncio.create_task(policy.generate(PROMPTS[0], [], greedy))
        await until_steps(policy, 5)
        version = await policy.publish(other.state_dict())
        after = await policy.generate(PROMPTS[1], [], SamplingParams(temperature=0.0, max_tokens=4))
        return await spanning, version, after

    spanning, version, after = asyncio.run(go())
    later = asyncio.run(policy.generate(PROMPTS[0], [], greedy))
    assert version == 1
    assert spanning.policy_version == 0 and spanning.policy_versions == [0, 1]
    assert after.policy_version == 1 and after.policy_versions == [1]
    assert later.policy_versions == [1] and later.token_ids != spanning.token_ids
    # the swap happened between decode steps: each step ran on one version, and versions only go up
    versions = [r.version for r in policy.step_log]
    assert versions == sorted(versions) and versions[0] == 0 and versions[-1] == 1


def test_static_batching_is_still_available(sharp):
    static = make_policy(sharp, continuous=False)
    continuous = make_policy(sharp)
    sampling = [SamplingParams(temperature=0.0, max_tokens=n) for n in LENGTHS]

    async def go(policy):
        return await asyncio.gather(*(policy.generate(p, [], s) for p, s in zip(PROMPTS, sampling, strict=True)))

    a, b = asyncio.run(go(static)), asyncio.run(go(continuous))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert static.batches == 1 and not static.step_log and all(c.policy_versions == [0] for c in a)


def test_generate_ids_and_score_share_the_engine(sharp):
    policy = make_policy(sharp)
    prompt = policy.chat.prompt_ids(PROMPTS[3])

    async def go():
        return await asyncio.gather(
            policy.generate_ids(prompt, SamplingParams(temperature=0.9, max_tokens=12)),
            policy.generate(PROMPTS[4], [], SamplingParams(temperature=0.9, max_tokens=20)),
        )

    raw, _ = asyncio.run(go())
    scored, version = asyncio.run(policy.score_with_version(raw.prompt_ids + raw.token_ids, temperature=0.9))
    assert version == 0 and scored[0] is None
    tail = scored[len(raw.prompt_ids) :]
    assert max(abs(a - b) for a, b in zip(raw.logprobs, tail, strict=True)) < 1e-4


def test_long_prompt_joining_short_rows_and_leaving_again(sharp):
    """A joiner longer than the running cache shifts it right; once it leaves the unused columns are trimmed."""
    policy = make_policy(sharp)
    short = [Message(role="user", content="Hi.")]
    long = [Message(role="user", content="Compute " + "+".join(str(i) for i in range(60)) + ".")]
    a_sampling = SamplingParams(temperature=0.0, max_tokens=60)
    b_sampling = SamplingParams(temperature=0.0, max_tokens=4)

    async def go():
        a = asyncio.create_task(policy.generate(short, [], a_sampling))
        await until_steps(policy, 3)
        b = await policy.generate(long, [], b_sampling)
        return await a, b

    a, b = asyncio.run(go())
    alone_a = asyncio.run(policy.generate(short, [], a_sampling))
    alone_b = asyncio.run(policy.generate(long, [], b_sampling))
    assert a.token_ids == alone_a.token_ids and b.token_ids == alone_b.token_ids
    assert len(a.token_ids) > 20 and len(b.token_ids) == 4  # a ran on well past b
    log = list(policy.step_log)[: len(a.token_ids)]
    widest = max(r.cache_len for r in log)
    assert widest > len(b.prompt_ids)  # b's prompt widened the cache ...
    assert log[-1].cache_len < widest // 2 + 8  # ... and the columns only b used were dropped after it left


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(sharp):
    policy = make_policy(sharp)
    real = policy._forward
    calls = {"n": 0}

    def flaky(joining):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real(joining)

    policy._forward = flaky
    greedy = SamplingParams(temperature=0.0, max_tokens=5)

    async def go():
        return await asyncio.gather(*(policy.generate(p, [], greedy) for p in PROMPTS[:3]), return_exceptions=True)

    failed = asyncio.run(go())
    assert all(isinstance(f, PolicyError) and "device lost" in str(f) for f in failed)
    assert all(f.status_code == 500 for f in failed)  # a server fault for a server to answer, not a 400
    assert policy.running == 0
    again = asyncio.run(policy.generate(PROMPTS[0], [], greedy))
    assert len(again.token_ids) == 5 and again.policy_versions == [0]


def test_close_fails_requests_in_flight(sharp):
    policy = make_policy(sharp)

    async def go():
        task = asyncio.create_task(policy.generate(PROMPTS[0], [], SamplingParams(temperature=0.0, max_tokens=40)))
        await until_steps(policy, 2)
        await policy.close()
        with pytest.raises(PolicyError, match="closed") as closed:
            await task
        assert closed.value.status_code == 503  # a server answers it as unavailable (retry), not a bad request
        return await policy.generate(PROMPTS[1], [], SamplingParams(temperature=0.0, max_tokens=3))

    after = asyncio.run(go())
    assert len(after.token_ids) == 3  # a closed policy starts again on the next request


def test_a_step_is_one_forward_pass_and_the_attention_setting_is_restored(sharp):
    """Joining prompts ride in the running rows' forward pass: one model call per step, joins or not."""
    policy = make_policy(sharp)
    calls = {"n": 0}
    policy.model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    before = policy.model.config._attn_implementation
    sampling = [SamplingParams(temperature=0.0, max_tokens=n) for n in LENGTHS]
    asyncio.run(staggered(policy, sampling, [0, 2, 0, 3, 1, 5, 0, 2]))
    log = list(policy.step_log)
    assert any(r.decoded >= 1 and r.joined >= 1 for r in log)
    assert calls["n"] == policy.decode_steps == len(log)
    assert policy.model.config._attn_implementation == before  # the flat attention is switched on per pass only


def test_grouped_query_attention_batches_exactly(sharp):
    """A model whose query heads share key/value heads (like SmolLM2): batched == alone, log-probs == forward."""
    tok = sharp[1]
    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_id,
        eos_token_id=tok.eos_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.2)
    policy = make_policy((model, tok))
    greedy = [SamplingParams(temperature=0.0, max_tokens=n) for n in LENGTHS]

    async def go():
        joined = await staggered(policy, greedy, [0, 2, 0, 3, 1, 5, 0, 2])
        alone = [await policy.generate(p, [], s) for p, s in zip(PROMPTS, greedy, strict=True)]
        warm = [SamplingParams(temperature=0.8, max_tokens=n) for n in LENGTHS]
        sampled = await staggered(policy, warm, [0, 1, 1, 2, 0, 3, 1, 1])
        return joined, alone, sampled

    joined, alone, sampled = asyncio.run(go())
    assert [c.token_ids for c in joined] == [c.token_ids for c in alone]
    for c in sampled:
        expected = forward_logprobs(policy.model, c.prompt_ids, c.token_ids, 0.8)
        assert max(abs(a - b) for a, b in zip(c.logprobs, expected, strict=True)) < 1e-4


def test_kv_slots_keep_every_rows_entries_through_joins_leaves_and_moves():
    """Random joins (short and long prompts) and leaves: each row's masked cache entries are exactly its tokens."""
    rng = random.Random(0)
    slots = KVSlots(torch.device("cpu"))
    histories: list[list[float]] = []
    counter = 0.0
    for _ in range(400):
        joins = [rng.choice([1, 3, 8, 30, 90]) for _ in range(rng.choice([0, 0, 0, 1, 2, 5]))]
        if not histories and not joins:
            joins = [rng.randint(1, 40)]
        plan = slots.plan(len(histories), joins)
        values = []
        for history in histories:  # one pending token per running row
            counter += 1
            history.append(counter)
            values.append(counter)
        for length in joins:
            prompt = [counter + 1 + i for i in range(length)]
            counter += length
            histories.append(prompt)
            values += prompt
        kv_1GN1 = torch.tensor(values).reshape(1, 1, -1, 1)
        plan.attend(0, kv_1GN1, kv_1GN1, kv_1GN1, 1.0)
        keys, mask = slots.keys[0], slots.mask_BL
        window = slice(slots.base, slots.base + slots.length)
        for b, history in enumerate(histories):
            assert keys[b, 0, window, 0][mask[b, window]].tolist() == history
        keep = sorted(rng.sample(range(len(histories)), k=rng.randint(len(histories) // 2, len(histories))))
        order = slots.keep(keep)
        histories = [histories[b] for b in order]
        assert slots.rows == len(histories) and (not histories or min(slots.starts) == 0)
