"""EndpointPolicy against our own server over loopback, response shapes of vLLM/SGLang, and outages."""

from __future__ import annotations

import asyncio
import copy
import socket

import openai
import pytest
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from openai import OpenAI

from safactory.data.redact import Redactor
from safactory.data.store import TrajectoryStore
from safactory.evolve.losses import token_logprobs
from safactory.policy.base import Completion, Policy, PolicyError, SamplingParams
from safactory.policy.chat import PlainTextChat
from safactory.policy.endpoint import EndpointError, EndpointPolicy, completion_from_response, tool_to_openai
from safactory.policy.local import LocalPolicy
from safactory.policy.models import save_model
from safactory.policy.recorder import ProxyRecorder
from safactory.policy.server import create_policy_app, create_proxy_app
from safactory.sim.envs.arith import ANSWER, CALC
from safactory.types import Message, ToolCall, ToolSpec

MESSAGES = [Message(role="user", content="Compute 12+3.")]


def forward_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    lp = token_logprobs(logits[:, :-1], ids[:, 1:], torch.tensor([temperature]))
    return lp[0, len(prompt_ids) - 1 :].tolist()


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def fast(url: str, **kwargs) -> EndpointPolicy:
    return EndpointPolicy.from_spec(f"openai:{url}#tiny", backoff_s=0.01, **kwargs)


def test_spec_strings():
    p = EndpointPolicy.from_spec("openai:http://127.0.0.1:8000/v1#tiny", api_key="k")
    assert (p.base_url, p.model, p.api_key) == ("http://127.0.0.1:8000/v1", "tiny", "k")
    assert (
        EndpointPolicy.from_spec("openai:http://localhost:30000#org/model-7b").base_url == "http://localhost:30000/v1"
    )
    assert EndpointPolicy.from_spec("openai:http://h:1/v1#m").spec == "openai:http://h:1/v1#m"
    assert isinstance(p, Policy)
    for bad in ("http://127.0.0.1:8000/v1#tiny", "openai:http://127.0.0.1:8000/v1", "openai:ftp://x/v1#m", "openai:#m"):
        with pytest.raises(ValueError):
            EndpointPolicy.from_spec(bad)


def test_exact_token_ids_and_logprobs_come_through_our_server(serve, tiny):
    model, tok = tiny
    served = LocalPolicy(copy.deepcopy(model), PlainTextChat(tok))
    server = serve(create_policy_app(served, model_name="tiny"))
    endpoint = fast(server.url)
    sampling = SamplingParams(temperature=0.7, max_tokens=16)

    async def go() -> list[Completion]:
        return list(await asyncio.gather(*(endpoint.generate(MESSAGES, [CALC, ANSWER], sampling) for _ in range(3))))

    for c in asyncio.run(go()):
        assert c.prompt_ids == served.chat.prompt_ids(MESSAGES)
        assert c.token_ids and len(c.logprobs) == len(c.token_ids)
        assert max_diff(c.logprobs, forward_logprobs(model, c.prompt_ids, c.token_ids, 0.7)) < 1e-4
        assert c.text == tok.decode(c.token_ids)
        assert (c.policy_version, c.temperature, c.finish_reason in ("stop", "length")) == (0, 0.7, True)

    # greedy through the endpoint equals greedy on an identical local policy
    local = LocalPolicy(copy.deepcopy(model), PlainTextChat(tok))
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    remote_c = asyncio.run(endpoint.generate(MESSAGES, [], greedy))
    local_c = asyncio.run(local.generate(MESSAGES, [], greedy))
    assert remote_c.token_ids == local_c.token_ids and remote_c.prompt_ids == local_c.prompt_ids
    assert remote_c.parse_error == local_c.parse_error


class ToolCaller:
    """A policy that always calls `calc` with fixed arguments."""

    version = 2

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        call = ToolCall(id="call_0", name="calc", arguments={"expression": "12+3"})
        return Completion(text="calc(12+3)", tool_calls=[call], prompt_ids=[1], token_ids=[9, 2], logprobs=[-1.0, -2.0])


def test_tool_calls_map_to_our_tool_calls(serve):
    server = serve(create_policy_app(ToolCaller(), model_name="tiny"))
    c = asyncio.run(fast(server.url).generate(MESSAGES, [CALC, ANSWER], SamplingParams(max_tokens=4)))
    assert [(t.name, t.arguments) for t in c.tool_calls] == [("calc", {"expression": "12+3"})]
    assert c.parse_error is None and c.finish_reason == "stop"
    assert (c.token_ids, c.logprobs, c.prompt_ids) == ([9, 2], [-1.0, -2.0], [1])


class Swapped:
    """A policy whose completion spans a weight swap: its tokens came from versions 2 and 3."""

    version = 3

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        return Completion(
            text="hi", prompt_ids=[1], token_ids=[9, 2], logprobs=[-1.0, -2.0], policy_version=2, policy_versions=[2, 3]
        )


def test_every_policy_version_a_completion_touched_comes_through_the_server(serve, tmp_path):
    store = TrajectoryStore.in_dir(tmp_path, redactor=Redactor())
    server = serve(create_policy_app(Swapped(), model_name="tiny", recorder=ProxyRecorder(store)))
    c = asyncio.run(fast(server.url).generate(MESSAGES, [], SamplingParams(max_tokens=4)))
    assert (c.policy_version, c.policy_versions) == (2, [2, 3])
    (traj,) = store.query(kind="proxy")
    assert (traj.steps[0].trace.policy_version, traj.steps[0].trace.policy_versions) == (2, [2, 3])
    assert traj.policy_versions() == [2, 3]


def _response(tool_arguments: str) -> dict:
    call = {"id": "x", "type": "function", "function": {"name": "calc", "arguments": tool_arguments}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    return {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls", "logprobs": None}]}


def test_bad_tool_arguments_are_a_parse_error_not_an_exception():
    sampling = SamplingParams()
    c = completion_from_response(_response("{not json"), sampling)
    assert c.tool_calls == [] and "not valid JSON" in (c.parse_error or "")
    c = completion_from_response(_response("[1, 2]"), sampling)
    assert c.tool_calls == [] and "JSON object" in (c.parse_error or "")
    c = completion_from_response(_response('{"expression": "1+1"}'), sampling)
    assert c.tool_calls[0].arguments == {"expression": "1+1"} and c.parse_error is None


def test_tool_arguments_too_deep_or_with_too_long_numbers_are_a_parse_error():
    for arguments in ("[" * 5000, '{"x": ' + "9" * 5000 + "}"):
        c = completion_from_response(_response(arguments), SamplingParams())
        assert c.tool_calls == [] and "not valid JSON" in (c.parse_error or "")


def test_vllm_and_sglang_response_shapes_give_token_ids():
    sampling = SamplingParams(temperature=1.0)
    content = [{"token": "token_id:7", "logprob": -0.5}, {"token": "token_id:2", "logprob": -0.1}]
    choice = {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"}
    vllm = {"prompt_token_ids": [1, 5], "choices": [{**choice, "token_ids": [7, 2], "logprobs": {"content": content}}]}
    c = completion_from_response(vllm, sampling, default_version=4)
    assert (c.prompt_ids, c.token_ids, c.logprobs, c.policy_version) == ([1, 5], [7, 2], [-0.5, -0.1], 4)

    sglang = {
        "choices": [{**choice, "prompt_token_ids": [1, 5], "token_ids": [7, 2], "logprobs": {"content": content}}]
    }
    c = completion_from_response(sglang, sampling)
    assert (c.prompt_ids, c.token_ids) == ([1, 5], [7, 2])

    old_vllm = {"choices": [{**choice, "logprobs": {"content": content}}]}  # only return_tokens_as_token_ids
    c = completion_from_response(old_vllm, sampling)
    assert (c.prompt_ids, c.token_ids, c.logprobs) == (None, [7, 2], [-0.5, -0.1])

    plain = {"choices": [{**choice, "logprobs": {"content": [{"token": "a", "logprob": -0.5}]}}]}
    c = completion_from_response(plain, sampling)
    assert (c.prompt_ids, c.token_ids, c.logprobs) == (None, None, [-0.5])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_down_endpoint_is_a_clear_error_after_bounded_retries(serve):
    endpoint = fast(f"http://127.0.0.1:{_closed_port()}/v1", timeout_s=5)
    with pytest.raises(PolicyError, match="is down or unreachable: chat completion failed 3 times"):
        asyncio.run(endpoint.generate(MESSAGES, [], SamplingParams(max_tokens=2)))

    hits: list[int] = []
    flaky = FastAPI()

    @flaky.post("/v1/chat/completions")
    async def overloaded() -> JSONResponse:
        hits.append(503)
        return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)

    @flaky.post("/v1/completions")
    async def refuses() -> JSONResponse:
        hits.append(400)
        return JSONResponse({"error": {"message": "prompt too long"}}, status_code=400)

    server = serve(flaky)
    endpoint = fast(server.url)
    with pytest.raises(EndpointError, match="down") as down:
        asyncio.run(endpoint.generate(MESSAGES, [], SamplingParams(max_tokens=2)))
    assert hits == [503, 503, 503] and down.value.status_code == 503
    with pytest.raises(EndpointError, match="prompt too long") as refused:
        asyncio.run(endpoint.score([1, 2, 3]))
    assert hits[3:] == [400] and refused.value.status_code == 400  # a refusal is not retried


def test_score_through_the_endpoint_equals_a_forward_pass(serve, tiny):
    model, tok = tiny
    server = serve(create_policy_app(LocalPolicy(copy.deepcopy(model), PlainTextChat(tok)), model_name="tiny"))
    ids = [tok.bos_id, *tok.encode("U: Compute 2*7.\nA: answer(14)"), tok.eos_id]
    scored = asyncio.run(fast(server.url).score(ids))
    assert scored[0] is None and len(scored) == len(ids)
    assert max_diff(scored[1:], forward_logprobs(model, ids[:1], ids[1:], 1.0)) < 1e-4


def test_load_weights_through_the_endpoint(serve, tiny, tmp_path):
    model, tok = tiny
    server = serve(create_policy_app(LocalPolicy(copy.deepcopy(model), PlainTextChat(tok)), model_name="tiny"))
    save_model(model, tok, tmp_path / "ckpt")
    endpoint = fast(server.url)
    assert asyncio.run(endpoint.load_weights(str(tmp_path / "ckpt"), version=4)) == 4
    assert asyncio.run(endpoint.generate(MESSAGES, [], SamplingParams(max_tokens=2))).policy_version == 4
    with pytest.raises(EndpointError, match="could not load"):
        asyncio.run(endpoint.load_weights(str(tmp_path / "nothing")))
    assert endpoint.version == 4


def test_recording_proxy_in_front_of_an_endpoint(serve, tiny, tmp_path):
    model, tok = tiny
    upstream = serve(create_policy_app(LocalPolicy(copy.deepcopy(model), PlainTextChat(tok)), model_name="tiny"))
    store = TrajectoryStore.in_dir(tmp_path, redactor=Redactor())
    proxy = serve(create_proxy_app(fast(upstream.url), ProxyRecorder(store), model_name="agent-model"))

    agent = OpenAI(base_url=proxy.url, api_key="none", max_retries=0, timeout=60)
    r = agent.chat.completions.create(
        model="agent-model",
        messages=[{"role": "user", "content": "Compute 12+3."}],
        tools=[tool_to_openai(CALC), tool_to_openai(ANSWER)],
        temperature=0.8,
        max_tokens=10,
        logprobs=True,
    )
    extra = r.model_dump()["safactory"]
    ours = extra["choices"][0]
    assert extra["prompt_token_ids"] == PlainTextChat(tok).prompt_ids(MESSAGES)
    assert [e.logprob for e in r.choices[0].logprobs.content] == ours["logprobs"]
    assert max_diff(ours["logprobs"], forward_logprobs(model, extra["prompt_token_ids"], ours["token_ids"], 0.8)) < 1e-4

    (traj,) = store.query(kind="proxy")
    trace = traj.steps[0].trace
    assert (trace.prompt_ids, trace.completion_ids) == (extra["prompt_token_ids"], ours["token_ids"])
    assert max_diff(trace.logprobs, ours["logprobs"]) < 1e-6 and trace.temperature == pytest.approx(0.8)
    assert traj.steps[0].action.content == r.choices[0].message.content
    assert traj.tags["model"] == "agent-model"

    upstream.stop()  # the upstream goes away: the proxy answers 503 after its bounded retries
    with pytest.raises(openai.InternalServerError, match="down or unreachable"):
        agent.chat.completions.create(model="agent-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert store.count(kind="proxy") == 1
