"""The OpenAI-compatible policy server, spoken to with the official `openai` client over loopback."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import time

import openai
import pytest
import torch
from openai import OpenAI
from transformers import PreTrainedTokenizerFast

from safactory.data.redact import Redactor
from safactory.data.store import TrajectoryStore
from safactory.evolve.losses import token_logprobs
from safactory.policy.base import Completion, SamplingParams
from safactory.policy.chat import PlainTextChat, TemplateChat
from safactory.policy.endpoint import tool_to_openai
from safactory.policy.local import LocalPolicy
from safactory.policy.models import TinyModelSpec, build_tiny, save_model
from safactory.policy.openai_wire import messages_from_openai
from safactory.policy.recorder import ProxyRecorder
from safactory.policy.server import BackgroundServer, check_bind, create_policy_app, serve_policy
from safactory.policy.subword import train_subword
from safactory.sim.envs.arith import ANSWER, CALC
from safactory.types import Message, ToolCall, ToolSpec
from tests.conftest import perturbed

TOOLS = [tool_to_openai(CALC), tool_to_openai(ANSWER)]
USER = [{"role": "user", "content": "Compute 12+3."}]


def forward_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    lp = token_logprobs(logits[:, :-1], ids[:, 1:], torch.tensor([temperature]))
    return lp[0, len(prompt_ids) - 1 :].tolist()


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


class ScriptedPolicy:
    """Answers every request with one fixed completion and remembers what it was asked."""

    def __init__(self, text: str, calls: list[ToolCall]) -> None:
        self.text = text
        self.calls = calls
        self.version = 3
        self.seen: list[tuple[list[Message], list[ToolSpec], SamplingParams]] = []

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        self.seen.append((messages, tools, sampling))
        return Completion(
            text=self.text,
            tool_calls=list(self.calls),
            prompt_ids=[1, 2, 3],
            token_ids=[40, 41, 2],
            logprobs=[-0.5, -0.25, -0.125],
            policy_version=self.version,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            finish_reason="stop",
        )


def client_for(server: BackgroundServer, key: str = "none") -> OpenAI:
    return OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=60)


def test_models_lists_the_served_model_and_version(serve, policy):
    server = serve(create_policy_app(policy, model_name="tiny"))
    models = client_for(server).models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_dump()["policy_version"] == 0


def test_chat_logprobs_and_token_ids_match_a_forward_pass(serve, policy):
    server = serve(create_policy_app(policy, model_name="tiny"))
    r = client_for(server).chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, temperature=0.7, max_tokens=20, logprobs=True, top_logprobs=1
    )
    extra = r.model_dump()["safactory"]
    prompt_ids = extra["prompt_token_ids"]
    assert prompt_ids == policy.chat.prompt_ids([Message(role="user", content="Compute 12+3.")])
    (ours,) = extra["choices"]
    token_ids = ours["token_ids"]
    content = r.choices[0].logprobs.content
    assert len(content) == len(token_ids) == len(ours["logprobs"]) > 0
    assert [c.logprob for c in content] == ours["logprobs"]
    assert [c.token for c in content] == [policy.chat.tokenizer.decode([t], skip_special=False) for t in token_ids]
    assert all(c.top_logprobs[0].token == c.token for c in content)  # top_logprobs: the sampled token
    assert max_diff(ours["logprobs"], forward_logprobs(policy.model, prompt_ids, token_ids, 0.7)) < 1e-4
    assert r.choices[0].message.content == policy.chat.tokenizer.decode(token_ids)
    assert extra["policy_version"] == 0 and r.system_fingerprint == "safactory-v0"
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(token_ids)


def test_n_choices_each_carry_their_own_tokens_and_logprobs(serve, policy):
    server = serve(create_policy_app(policy, model_name="tiny"))
    r = client_for(server).chat.completions.create(
        model="tiny", messages=USER, n=3, temperature=1.0, max_tokens=12, logprobs=True
    )
    extra = r.model_dump()["safactory"]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len(extra["choices"]) == 3
    for choice, ours in zip(r.choices, extra["choices"], strict=True):
        assert [c.logprob for c in choice.logprobs.content] == ours["logprobs"]
        expected = forward_logprobs(policy.model, extra["prompt_token_ids"], ours["token_ids"], 1.0)
        assert max_diff(ours["logprobs"], expected) < 1e-4


def test_vllm_style_token_id_fields_on_request(serve, policy):
    server = serve(create_policy_app(policy, model_name="tiny"))
    r = client_for(server).chat.completions.create(
        model="tiny",
        messages=USER,
        max_tokens=6,
        logprobs=True,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True},
    )
    data = r.model_dump()
    ours = data["safactory"]["choices"][0]
    assert data["prompt_token_ids"] == data["safactory"]["prompt_token_ids"]
    assert data["choices"][0]["token_ids"] == ours["token_ids"]
    assert [c.token for c in r.choices[0].logprobs.content] == [f"token_id:{t}" for t in ours["token_ids"]]


def test_tool_messages_and_tool_calls_in_openai_format(serve):
    scripted = ScriptedPolicy("answer(15)", [ToolCall(id="call_0", name="answer", arguments={"value": "15"})])
    server = serve(create_policy_app(scripted, model_name="scripted"))
    messages = [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": [{"type": "text", "text": "Compute 12+3."}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"expression": "12+3"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "15"},
    ]
    r = client_for(server).chat.completions.create(
        model="scripted", messages=messages, tools=TOOLS, temperature=0.5, top_p=0.9, max_completion_tokens=7, stop="\n"
    )
    seen_messages, seen_tools, sampling = scripted.seen[0]
    assert [m.role for m in seen_messages] == ["system", "user", "assistant", "tool"]
    assert seen_messages[1].content == "Compute 12+3."
    assert seen_messages[2].tool_calls == [ToolCall(id="c1", name="calc", arguments={"expression": "12+3"})]
    assert seen_messages[3].tool_call_id == "c1" and seen_messages[3].content == "15"
    assert seen_tools == [CALC.model_copy(update={"read_only": False}), ANSWER]
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.stop) == (0.5, 0.9, 7, ["\n"])

    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "answer(15)"  # the text the model wrote, so it re-renders exactly
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "answer"
    assert json.loads(call.function.arguments) == {"value": "15"}
    assert call.id.startswith("call_")

    plain = client_for(server).chat.completions.create(
        model="scripted", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "stop"


def test_bad_requests_get_clear_openai_errors(serve, policy):
    server = serve(create_policy_app(policy, model_name="tiny"))
    client = client_for(server)
    with pytest.raises(openai.BadRequestError, match="streaming"):
        client.chat.completions.create(model="tiny", messages=USER, stream=True)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="other", messages=USER)
    bad_call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "calc", "arguments": "{oops"}}],
    }
    with pytest.raises(openai.BadRequestError, match="not valid JSON"):
        client.chat.completions.create(model="tiny", messages=[*USER, bad_call])
    with pytest.raises(openai.BadRequestError, match="only text content"):
        image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": image}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=USER, temperature=5.0)
    with pytest.raises(openai.BadRequestError, match="exceeds"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 600}], max_tokens=8)
    # without max_tokens the default is capped by what is left of the context, as vLLM does
    long = [{"role": "user", "content": "x" * 490}]
    room = policy.max_positions - len(policy.chat.prompt_ids(messages_from_openai(long)))
    r = client.chat.completions.create(model="tiny", messages=long, temperature=0)
    assert 0 < r.usage.completion_tokens <= room


def test_prompt_logprobs_via_completions_equal_a_forward_pass(serve, policy):
    server = serve(create_policy_app(policy, model_name="tiny"))
    client = client_for(server)
    tok = policy.chat.tokenizer
    text = "U: Compute 12+3.\nA: calc(12+3)"
    ids = [tok.bos_id, *tok.encode(text)]
    expected = forward_logprobs(policy.model, ids[:1], ids[1:], 1.0)

    r = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text
    assert lp.tokens == [tok.decode([t], skip_special=False) for t in ids]
    assert lp.token_logprobs[0] is None
    assert max_diff(lp.token_logprobs[1:], expected) < 1e-4
    assert r.model_dump()["safactory"]["choices"][0]["prompt_token_ids"] == ids

    by_ids = client.completions.create(
        model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0, extra_body={"prompt_logprobs": 0}
    )
    assert by_ids.choices[0].logprobs.token_logprobs == lp.token_logprobs
    vllm_style = by_ids.model_dump()["choices"][0]["prompt_logprobs"]
    assert vllm_style[0] is None
    assert [entry[str(t)]["logprob"] for t, entry in zip(ids[1:], vllm_style[1:], strict=True)] == lp.token_logprobs[1:]

    more = client.completions.create(model="tiny", prompt=ids, max_tokens=5, echo=True, logprobs=1, temperature=0.8)
    ours = more.model_dump()["safactory"]["choices"][0]
    out_ids = ours["token_ids"]
    assert len(out_ids) == 5 and more.choices[0].finish_reason == "length"
    got = more.choices[0].logprobs.token_logprobs
    assert len(got) == len(ids) + 5
    assert max_diff(got[1 : len(ids)], expected) < 1e-4  # prompt: the model at temperature 1
    assert max_diff(got[len(ids) :], forward_logprobs(policy.model, ids, out_ids, 0.8)) < 1e-4  # sampled


def test_load_weights_bumps_the_version_and_bad_loads_keep_the_old_one(serve, policy, tiny, tmp_path):
    model, tok = tiny
    other = perturbed(model)
    save_model(other, tok, tmp_path / "v1")
    wrong_shape, _ = build_tiny(TinyModelSpec(hidden_size=32, layers=1, heads=2, intermediate_size=64), seed=1)
    save_model(wrong_shape, tok, tmp_path / "small")

    server = serve(create_policy_app(policy, model_name="tiny"))
    client = client_for(server)

    def greedy():
        r = client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_tokens=10)
        extra = r.model_dump()["safactory"]
        return extra["choices"][0]["token_ids"], extra["policy_version"], r.system_fingerprint

    before = greedy()
    assert before[1] == 0
    loaded = client.post("/load_weights", body={"path": str(tmp_path / "v1")}, cast_to=object)
    assert loaded["policy_version"] == 1 and loaded["previous_version"] == 0
    after = greedy()
    assert after[1:] == (1, "safactory-v1")
    assert after[0] != before[0]

    (tmp_path / "empty").mkdir()
    for bad in ("missing", "empty"):
        with pytest.raises(openai.BadRequestError, match="could not load"):
            client.post("/load_weights", body={"path": str(tmp_path / bad)}, cast_to=object)
    with pytest.raises(openai.BadRequestError, match="does not fit"):
        client.post("/load_weights", body={"path": str(tmp_path / "small"), "version": 5}, cast_to=object)
    with pytest.raises(openai.ConflictError, match="does not go up"):
        client.post("/load_weights", body={"path": str(tmp_path / "v1"), "version": 1}, cast_to=object)
    assert greedy() == after  # the old version keeps serving, unchanged
    assert client.models.list().data[0].model_dump()["policy_version"] == 1

    again = client.post("/load_weights", body={"path": str(tmp_path / "v1"), "version": 7}, cast_to=object)
    assert again["policy_version"] == 7 and greedy()[1] == 7


def test_bearer_token_guards_every_endpoint(serve, policy):
    server = serve(create_policy_app(policy, model_name="tiny", token="s3cret"))
    wrong = client_for(server, "wrong")
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny", prompt="x", max_tokens=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.post("/load_weights", body={"path": "/nonexistent"}, cast_to=object)
    right = client_for(server, "s3cret")
    assert right.models.list().data[0].id == "tiny"
    assert right.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices


def test_non_loopback_bind_needs_a_token(tmp_path):
    with pytest.raises(ValueError, match="without a token"):
        serve_policy(tmp_path, host="0.0.0.0", port=0, token=None)
    with pytest.raises(ValueError, match="without a token"):
        check_bind("example.com", "")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    check_bind("0.0.0.0", "s3cret")


def test_recording_proxy_stores_what_passed_through(serve, policy, tmp_path):
    store = TrajectoryStore.in_dir(tmp_path, redactor=Redactor())
    recorder = ProxyRecorder(store, run_id="agent-1")
    server = serve(create_policy_app(policy, model_name="tiny", recorder=recorder))
    client = client_for(server)

    first = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, temperature=0, max_tokens=10, logprobs=True
    )
    assistant = first.choices[0].message.model_dump(exclude_none=True)
    turn2 = [*USER, assistant, {"role": "user", "content": "Now answer."}]
    second = client.chat.completions.create(model="tiny", messages=turn2, tools=TOOLS, temperature=0.9, max_tokens=8)

    stored = store.query(run_id="agent-1", kind="proxy")
    assert [t.group_id for t in stored] == [first.id, second.id]
    assert stored[0].task.id == stored[1].task.id  # one agent episode, one task
    assert stored[0].task.prompt == "Compute 12+3."
    for traj, response in zip(stored, (first, second), strict=True):
        extra = response.model_dump()["safactory"]
        assert extra["recorded"] is True and extra["trajectory_ids"] == [traj.id]
        (step,) = traj.steps
        assert step.trace.prompt_ids == extra["prompt_token_ids"]
        assert step.trace.completion_ids == extra["choices"][0]["token_ids"]
        assert max_diff(step.trace.logprobs, extra["choices"][0]["logprobs"]) < 1e-6
        assert step.trace.policy_version == 0
        assert step.action.content == response.choices[0].message.content
        assert [t.name for t in traj.tools] == ["calc", "answer"]
    assert [m.role for m in stored[1].prompt] == ["user", "assistant", "user"]
    assert stored[1].steps[0].trace.temperature == pytest.approx(0.9)
    # the assistant message sent back re-renders to exactly the tokens that were sampled
    t1, t2 = stored[0].steps[0].trace, stored[1].steps[0].trace
    sampled = t1.prompt_ids + t1.completion_ids
    assert t2.prompt_ids[: len(sampled)] == sampled
    assert recorder.recorded == 2 and recorder.failures == 0


def test_a_failing_store_does_not_fail_the_request(serve, policy, tmp_path):
    class BrokenStore:
        def create_run(self, run_id: str, config: dict) -> None:
            pass

        def add(self, items: list) -> int:
            raise OSError("disk full")

    recorder = ProxyRecorder(BrokenStore(), raw=True)  # type: ignore[arg-type]
    server = serve(create_policy_app(policy, model_name="tiny", recorder=recorder))
    r = client_for(server).chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    assert r.choices and r.model_dump()["safactory"]["recorded"] is False
    assert recorder.failures == 1 and "disk full" in (recorder.last_error or "")


def test_the_recorder_stores_redacted_data_unless_raw(serve, policy, tmp_path):
    with pytest.raises(ValueError, match="redacted"):
        ProxyRecorder(TrajectoryStore.in_dir(tmp_path / "plain"))
    secret = "sk-" + "a1B2c3D4e5F6g7H8i9J0k1L2"
    messages = [{"role": "user", "content": f"My key is {secret}. Compute 12+3."}]
    for name, raw in (("red", False), ("raw", True)):
        store = TrajectoryStore.in_dir(tmp_path / name, redactor=None if raw else Redactor())
        server = serve(create_policy_app(policy, model_name="tiny", recorder=ProxyRecorder(store, raw=raw)))
        client_for(server).chat.completions.create(model="tiny", messages=messages, max_tokens=3)
        (traj,) = store.query(kind="proxy")
        assert (secret in traj.model_dump_json()) is raw
        assert traj.provenance["redacted"] is not raw
        store.close()


def test_raw_completions_need_a_token_policy(serve):
    scripted = ScriptedPolicy("hi", [])
    server = serve(create_policy_app(scripted, model_name="scripted"))
    with pytest.raises(openai.InternalServerError, match="raw prompts"):
        client_for(server).completions.create(model="scripted", prompt="x", max_tokens=1)


def test_local_policy_score_equals_a_forward_pass(tiny):
    model, tok = tiny
    policy = LocalPolicy(copy.deepcopy(model), PlainTextChat(tok))
    ids = [tok.bos_id, *tok.encode("U: What is 3 + 4?\nA: calc(3+4)")]
    scored = asyncio.run(policy.score(ids))
    assert scored[0] is None and len(scored) == len(ids)
    assert max_diff(scored[1:], forward_logprobs(model, ids[:1], ids[1:], 1.0)) < 1e-5


def test_engine_failures_are_server_errors_a_client_retries(serve, policy):
    real, calls = policy._forward, {"n": 0}

    def flaky(joining):  # the engine's first step fails (a model or device error)
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real(joining)

    policy._forward = flaky
    server = serve(create_policy_app(policy, model_name="tiny"))
    with pytest.raises(openai.InternalServerError, match="device lost") as failed:
        client_for(server).chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    assert failed.value.status_code == 500 and failed.value.body["type"] == "server_error"
    assert client_for(server).chat.completions.create(model="tiny", messages=USER, max_tokens=3).choices


def test_malformed_client_input_is_a_400_and_anything_unexpected_a_500(serve, policy):
    client = client_for(serve(create_policy_app(policy, model_name="tiny")))
    for arguments in ("[" * 5000, '{"x": ' + "9" * 5000 + "}"):  # too deep, a number past the digit limit
        call = {"id": "c", "type": "function", "function": {"name": "calc", "arguments": arguments}}
        with pytest.raises(openai.BadRequestError, match="not valid JSON"):
            client.chat.completions.create(
                model="tiny", messages=[*USER, {"role": "assistant", "content": "", "tool_calls": [call]}]
            )
    for params, field in (({"type": "object", "properties": None}, "properties"), ({"required": 5}, "required")):
        tool = {"type": "function", "function": {"name": "calc", "parameters": params}}
        with pytest.raises(openai.BadRequestError, match=field):
            client.chat.completions.create(model="tiny", messages=USER, tools=[tool])
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model="tiny", messages=USER, top_logprobs=2)

    class Broken:
        async def generate(self, messages, tools, sampling):
            raise KeyError("a bug")

    broken = serve(create_policy_app(Broken(), model_name="broken"))
    with pytest.raises(openai.InternalServerError, match="a bug") as failed:
        client_for(broken).chat.completions.create(model="broken", messages=USER)
    assert failed.value.status_code == 500 and failed.value.body["type"] == "server_error"


def test_a_client_that_disconnects_cancels_its_generation(serve):
    spec = TinyModelSpec(hidden_size=32, layers=1, heads=2, intermediate_size=64, max_positions=4096)
    model, tok = build_tiny(spec, 0)
    bias = torch.zeros(len(tok))
    bias[tok.eos_id] = -1e4  # never ends by itself: runs to max_tokens
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    policy = LocalPolicy(model, PlainTextChat(tok), seed=0)
    server = serve(create_policy_app(policy, model_name="tiny"))
    max_tokens = 4000
    body = json.dumps({"model": "tiny", "messages": USER, "max_tokens": max_tokens, "n": 2}).encode()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    for _ in range(6000):  # bounded polls, no timing assumption
        if policy.running == 2:
            break
        time.sleep(0.01)
    assert policy.running == 2
    sock.close()  # the client goes away mid-generation
    for _ in range(6000):
        if policy.running == 0:
            break
        time.sleep(0.01)
    assert policy.running == 0 and policy.decode_steps < max_tokens  # cancelled, not run to the end


def test_default_max_tokens_counts_a_template_prompt_and_its_tools(serve):
    sub = train_subword(["hello world user assistant"] * 20, vocab_size=300)
    hf = PreTrainedTokenizerFast(tokenizer_object=sub.inner, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")
    hf.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    chat = TemplateChat(hf)
    messages = [Message(role="user", content="hello world")]
    with_tools = len(chat.prompt_ids(messages, [CALC, ANSWER]))  # the template lists the tools' schemas
    positions, default = with_tools + 64, 128
    assert len(chat.prompt_ids(messages)) + default <= positions  # only the tools leave too little room
    spec = TinyModelSpec(hidden_size=32, layers=1, heads=2, intermediate_size=64, max_positions=positions)
    policy = LocalPolicy(build_tiny(spec, 0, sub)[0], chat, seed=0)
    server = serve(create_policy_app(policy, model_name="m", default_max_tokens=default))
    r = client_for(server).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello world"}], tools=TOOLS, temperature=0
    )
    assert r.usage.prompt_tokens == with_tools and 0 < r.usage.completion_tokens <= positions - with_tools
