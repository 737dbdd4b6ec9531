import asyncio

import pytest
import torch

from safactory.evolve.losses import token_logprobs
from safactory.policy.base import PolicyError, SamplingParams
from safactory.policy.chat import PlainTextChat
from safactory.policy.local import LocalPolicy
from safactory.policy.models import TinyModelSpec, build_tiny, load_model, save_model
from safactory.policy.sampling import sample_tokens
from safactory.policy.subword import train_subword
from safactory.policy.tokenizer import CharTokenizer
from safactory.sim.envs.arith import ANSWER, CALC
from safactory.types import Message
from tests.conftest import perturbed

PROMPTS = [[Message(role="user", content="Compute " + "12+3" * k + ".")] for k in range(1, 9)]


def forward_logprobs(model, prompt_ids, completion_ids, temperature):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    lp = token_logprobs(logits[:, :-1], ids[:, 1:], torch.tensor([temperature]))
    return lp[0, len(prompt_ids) - 1 :].tolist()


def test_tokenizer_round_trip(tmp_path):
    tok = CharTokenizer()
    text = "calc(12+7*3)\nanswer(-5)"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    assert CharTokenizer.load(tmp_path).encode(text) == tok.encode(text)


def test_token_ids_decode_to_text_and_logprobs_match_a_forward_pass(policy):
    sampling = SamplingParams(temperature=0.7, max_tokens=24)

    async def go():
        return await asyncio.gather(*(policy.generate(p, [CALC, ANSWER], sampling) for p in PROMPTS))

    completions = asyncio.run(go())
    assert policy.batches == 1  # one batch across all concurrent requests
    for c in completions:
        ids = [i for i in c.token_ids if i != policy.chat.tokenizer.eos_id]
        assert policy.chat.tokenizer.decode(ids) == c.text
        assert len(c.logprobs) == len(c.token_ids) and c.policy_version == 0
        expected = forward_logprobs(policy.model, c.prompt_ids, c.token_ids, 0.7)
        assert max(abs(a - b) for a, b in zip(c.logprobs, expected, strict=True)) < 1e-4


def test_batched_greedy_equals_unbatched(policy):
    greedy = SamplingParams(temperature=0.0, max_tokens=16)

    async def go():
        batched = await asyncio.gather(*(policy.generate(p, [], greedy) for p in PROMPTS))
        single = [await policy.generate(p, [], greedy) for p in PROMPTS]
        return batched, single

    batched, single = asyncio.run(go())
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]


def test_hot_swap_is_visible_in_later_completions(policy, tiny):
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    other = perturbed(tiny[0])

    async def go():
        before = await policy.generate(PROMPTS[0], [], greedy)
        version = await policy.publish(other.state_dict())
        after = await policy.generate(PROMPTS[0], [], greedy)
        return before, version, after

    before, version, after = asyncio.run(go())
    assert before.policy_version == 0 and version == 1 and after.policy_version == 1
    assert before.token_ids != after.token_ids


def test_top_p_logprobs_are_of_the_truncated_distribution():
    logits_BV = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    tokens_B, logp_B = sample_tokens(logits_BV, torch.full((200,), 1.0), torch.full((200,), 0.7), gen)
    probs = torch.softmax(logits_BV[0], -1)
    kept = probs[:2] / probs[:2].sum()  # 0.665 + 0.245 >= 0.7: the top two tokens remain
    assert set(tokens_B.tolist()) <= {0, 1}
    for t, lp in zip(tokens_B.tolist(), logp_B.tolist(), strict=True):
        assert abs(lp - kept[t].log().item()) < 1e-5


def test_too_long_prompt_is_a_clear_error(policy):
    long = [Message(role="user", content="x" * 600)]
    with pytest.raises(PolicyError, match="exceeds"):
        asyncio.run(policy.generate(long, [], SamplingParams(max_tokens=8)))


def test_save_and_reload_like_any_hf_model(tiny, tmp_path):
    model, tok = tiny
    save_model(model, tok, tmp_path)
    again, tok2 = load_model(tmp_path)
    ids = torch.tensor([tok.encode("Compute 1+2.")])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-6)
    assert tok2.vocab_size == tok.vocab_size


@pytest.mark.parametrize("continuous", [True, False])
def test_a_stop_string_inside_a_token_stops_and_cuts_the_text_there(continuous):
    tok = train_subword(['calc({"a": 1})\nanswer({"b": 2})\n'] * 50, vocab_size=300)
    (closing,) = tok.encode("})")  # one token that holds the stop string "}" before its end
    model, tok = build_tiny(TinyModelSpec(hidden_size=32, layers=1, heads=2, intermediate_size=64), 0, tok)
    bias = torch.zeros(len(tok))
    bias[closing] = 100.0  # the model always writes "})"
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    policy = LocalPolicy(model, PlainTextChat(tok), continuous=continuous)
    prompt = [tok.bos_id, *tok.encode("U: hi\nA: ")]

    async def go(stop: list[str]):
        return await policy.generate_ids(prompt, SamplingParams(temperature=0.0, max_tokens=6, stop=stop))

    c = asyncio.run(go(["}", ")"]))
    # OpenAI/vLLM: finish "stop", text cut before the earliest stop; the sampled token stays in the trace
    assert (c.finish_reason, c.text, c.token_ids, len(c.logprobs)) == ("stop", "", [closing], 1)
    c = asyncio.run(go([")}"]))  # spans the first token's end and the second's start
    assert (c.finish_reason, c.text, c.token_ids) == ("stop", "}", [closing, closing])
    c = asyncio.run(go(["x"]))
    assert (c.finish_reason, c.text, c.token_ids) == ("length", "})" * 6, [closing] * 6)
