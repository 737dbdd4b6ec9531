"""Property-based fuzzing of both HTTP servers: no client input is answered with a 5xx, and each server
still serves a valid request afterwards.

Requests go over real HTTP to real uvicorn servers: the built-in arith env (`create_env_app`) and a
LocalPolicy on a tiny model (`create_policy_app`). Two generators per server:

* schemathesis, from the app's own OpenAPI schema: cases that fit it (positive) and cases that break
  it (negative), on every operation;
* hypothesis strategies of ours, for what a schema does not say: JSON of any shape, near-valid bodies
  with wrong leaves, raw bytes (not UTF-8, deep brackets, lone surrogate escapes) under any content
  type, calls in any order on a live session (step before reset, reset twice, calls after delete),
  unknown sessions, /tasks options, load_weights paths (long, NUL, missing, a file, a directory that
  holds no model, a real model).

The default tier runs a seeded subset (`derandomize=True`, EXAMPLES per generator and server); the
slow tier runs CAMPAIGN (10,000) generated inputs per generator and server, seeded afresh each run.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from safactory.policy.chat import PlainTextChat
from safactory.policy.local import LocalPolicy
from safactory.policy.models import TinyModelSpec, build_tiny, save_model
from safactory.policy.server import BackgroundServer, create_policy_app
from safactory.sim.envs.arith import ArithTasks
from safactory.sim.serve import create_env_app
from tests.remote_server import running_server

EXAMPLES = 120  # per generator and server in the default tier
CAMPAIGN = 10_000  # per generator and server in the slow tier
TINY = TinyModelSpec(hidden_size=32, layers=1, heads=2, intermediate_size=64, max_positions=256)
LIVE = "fuzz-live-session-0001"  # a session the schema-driven env cases may address by name
Check = Callable[[str, Any], None]  # (what was sent, the answer)


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=examples <= EXAMPLES,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


def no_server_error(sent: str, response: Any) -> None:
    assert response.status_code < 500, f"{sent} -> HTTP {response.status_code}: {response.text[:500]}"


# ---- what any client may send ------------------------------------------------------------
TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "null", "{}", "[]", "0", "-1", "1e999", "NaN", "\x00", "../..", "%00", "a" * 300]),
    st.from_regex(r"[0-9+\-*/(). e]{0,24}", fullmatch=True),  # arith-like expressions
    st.tuples(st.text(max_size=3), st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)).map(
        "".join  # with surrogates: JSON carries them as escapes, a lone one is not text
    ),
)
LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400), st.floats(), TEXT
)
JSON = st.recursive(
    LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=12
)
RAW = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([b"\xff\xfe\x80", b"{\xc3}", b'"\\ud800"', b'{"a": "\\udfff"}', b"9" * 5000, b"{", b"\x00"]),
    st.integers(min_value=0, max_value=3000).map(lambda k: b"[" * k + b"]" * (k % 2)),  # deep brackets
)
# mostly JSON: under no content type, or another one, FastAPI reads no JSON and refuses the body (422) itself
CONTENT_TYPE = st.sampled_from(["application/json"] * 24 + [None, "text/plain", "application/x-www-form-urlencoded"])


def encoded(value: Any) -> bytes:
    """JSON as a client library writes it (lone surrogates as escapes, NaN as Python writes it)."""
    return json.dumps(value).encode()


def often(common: st.SearchStrategy[Any], *rare: st.SearchStrategy[Any], times: int = 4) -> st.SearchStrategy[Any]:
    """`common` `times` as often as each of `rare` (a one_of of repeated branches does not weight them)."""
    return st.sampled_from([common] * times + list(rare)).flatmap(lambda chosen: chosen)


def body_of(near_valid: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes | None]:
    """A request body: mostly the near-valid shape, else any JSON, raw bytes or none."""
    return often(near_valid.map(encoded), JSON.map(encoded), RAW, st.none(), times=12)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the field's own kind of value, sometimes any JSON in its place: most bodies are valid
    or one field away from it, so the fuzzing reaches the code behind validation."""
    return often(strategy, JSON, times=16)


@dataclass(frozen=True)
class Call:
    """One request; `{sid}` in the path stands for the example's live session."""

    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = None
    params: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        body = "" if self.body is None else f" body={self.body[:200]!r}"
        return f"{self.method} {self.path} params={self.params!r} type={self.content_type}{body}"


def send(client: httpx.Client, call: Call, sid: str = "") -> httpx.Response:
    headers = {"content-type": call.content_type} if call.content_type else {}
    path = call.path.replace("{sid}", sid)
    if call.params:  # encoded here: httpx would refuse text with a lone surrogate before sending it
        path += "?" + urllib.parse.urlencode(call.params, encoding="utf-8", errors="surrogatepass")
    return client.request(call.method, path, content=call.body, headers=headers)


def calls(method: st.SearchStrategy[str], path: st.SearchStrategy[str], body: Any) -> st.SearchStrategy[Call]:
    return st.builds(Call, method, path, body, CONTENT_TYPE)


# ---- the env server ------------------------------------------------------------------------
REAL_TASKS = [t.model_dump(mode="json") for t in ArithTasks().tasks("train", 3)]
TASK = often(
    st.sampled_from(REAL_TASKS),
    st.builds(  # a real task with one field of any text (lone surrogates included)
        lambda task, key, text: {**task, key: text},
        st.sampled_from(REAL_TASKS),
        st.sampled_from(["id", "env_id", "split", "prompt"]),
        TEXT,
    ),
    st.builds(  # a real task whose private data is anything: an answer missing, or not a number
        lambda task, data: {**task, "data": data},
        st.sampled_from(REAL_TASKS),
        st.fixed_dictionaries({}, optional={"answer": LEAF, "expression": TEXT}) | JSON,
    ),
    st.fixed_dictionaries(
        {"id": maybe(TEXT), "env_id": maybe(st.just("arith")), "split": maybe(st.sampled_from(["train", "test"]))},
        optional={"prompt": maybe(TEXT), "data": maybe(st.fixed_dictionaries({}, optional={"answer": LEAF}))},
    ),
    times=2,
)
EXPRESSION = often(st.from_regex(r"[0-9+\-*/(). e]{0,24}", fullmatch=True), LEAF, times=2)
TOOL_CALL = st.one_of(  # the env's two tools with their argument (of any value), or any name and arguments
    st.fixed_dictionaries(
        {
            "id": maybe(TEXT),
            "name": st.just("calc"),
            "arguments": maybe(st.fixed_dictionaries({"expression": EXPRESSION})),
        }
    ),
    st.fixed_dictionaries(
        {"id": maybe(TEXT), "name": st.just("answer"), "arguments": maybe(st.fixed_dictionaries({"value": EXPRESSION}))}
    ),
    st.fixed_dictionaries(
        {"id": maybe(TEXT), "name": maybe(TEXT)}, optional={"arguments": maybe(st.dictionaries(TEXT, LEAF, max_size=2))}
    ),
)
ACTION = st.fixed_dictionaries(
    {
        "role": maybe(often(st.just("assistant"), st.sampled_from(["user", "tool", "system"]), TEXT, times=8)),
        "tool_calls": maybe(often(st.lists(TOOL_CALL, min_size=1, max_size=2), st.just([]), times=3)),
    },
    optional={
        "content": maybe(TEXT),
        "tool_call_id": maybe(TEXT),
        "name": maybe(TEXT),
    },
)
QUERY_VALUE = st.one_of(
    TEXT,
    st.integers(min_value=-2, max_value=300).map(str),
    JSON.map(json.dumps),
    st.fixed_dictionaries({}, optional={"seed": LEAF, "max_operand": LEAF, "test_percent": LEAF}).map(json.dumps),
    # deep: past Python's recursion limit (1000) and the URL limit (8 KiB, ~2700 brackets), up to the probe's 5000
    st.one_of(st.sampled_from([65, 1100, 2500, 5000]), st.integers(min_value=0, max_value=5000)).map(lambda k: "[" * k),
)
SESSION_PATH = often(
    st.just("{sid}"), TEXT.map(lambda s: urllib.parse.quote(s.encode("utf-8", "surrogatepass"))), times=6
)
ENV_CALLS = [
    calls(st.just("POST"), st.just("/sessions"), body_of(st.fixed_dictionaries({}, optional={"session_id": TEXT}))),
    calls(
        st.just("POST"),
        SESSION_PATH.map(lambda s: f"/sessions/{s}/reset"),
        body_of(st.fixed_dictionaries({"task": maybe(TASK)}, optional={"seed": maybe(st.integers())})),
    ),
    calls(
        st.just("POST"),
        SESSION_PATH.map(lambda s: f"/sessions/{s}/step"),
        body_of(st.fixed_dictionaries({"action": ACTION})),
    ),
    calls(st.just("DELETE"), SESSION_PATH.map(lambda s: f"/sessions/{s}"), st.none()),
    st.builds(
        Call,
        st.just("GET"),
        st.just("/tasks"),
        params=st.lists(st.tuples(st.sampled_from(["split", "n", "options", "other"]), QUERY_VALUE), max_size=3).map(
            tuple
        ),
    ),
    calls(
        st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
        st.sampled_from(["/health", "/spec", "/tasks", "/sessions", "/sessions/{sid}", "/nope"]),
        st.none() | RAW,
    ),
]
ENV_CALL = st.one_of(*ENV_CALLS)
EPISODE = st.tuples(ENV_CALLS[1], ENV_CALLS[2]).map(list)  # a reset, then a step: what a task does to the env
ENV_SCRIPT = st.tuples(  # (reset the live session first?, the calls)
    st.booleans(),
    st.lists(st.one_of(ENV_CALL.map(lambda call: [call]), EPISODE), min_size=1, max_size=4).map(
        lambda groups: [call for group in groups for call in group]
    ),
)


@pytest.fixture(scope="module")
def env_url() -> Iterator[str]:
    app = create_env_app("arith", max_sessions=16, max_tasks=200, env_timeout_s=60.0)
    with running_server(app) as url:
        yield url


def run_env_script(client: httpx.Client, script: tuple[bool, list[Call]], check: Check) -> None:
    """The calls on a fresh live session (reset first, or not), then every session they made closed;
    the server must still answer."""
    reset_first, script_calls = script
    live = client.post("/sessions")
    check("POST /sessions", live)
    sid = live.json()["session_id"]
    made = [sid]
    try:
        if reset_first:
            check("POST reset", client.post(f"/sessions/{sid}/reset", json={"task": REAL_TASKS[0]}))
        for call in script_calls:
            response = send(client, call, sid)
            check(str(call), response)
            if call.path == "/sessions" and call.method == "POST" and response.status_code == 200:
                made.append(response.json()["session_id"])
    finally:  # also after a failed check: the next example starts from an empty server
        for session_id in made:
            client.delete(f"/sessions/{session_id}")
    health = client.get("/health")
    check("GET /health", health)
    assert health.status_code == 200 and health.json()["active_sessions"] == 0, health.text


def a_valid_episode(url: str) -> None:
    """What a real client does, start to end: the server is still fine."""
    task = REAL_TASKS[0]
    with httpx.Client(base_url=url, timeout=60) as client:
        sid = client.post("/sessions").json()["session_id"]
        assert client.post(f"/sessions/{sid}/reset", json={"task": task}).status_code == 200
        call = {"id": "c", "name": "answer", "arguments": {"value": task["data"]["answer"]}}
        step = client.post(f"/sessions/{sid}/step", json={"action": {"role": "assistant", "tool_calls": [call]}})
        assert step.status_code == 200 and step.json()["reward"] == 1.0, step.text
        assert client.delete(f"/sessions/{sid}").json() == {"closed": True}


def fuzz_env_scripts(url: str, examples: int, check: Check = no_server_error) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:

        @fuzz_settings(examples)
        @given(ENV_SCRIPT)
        def scripts(script: tuple[bool, list[Call]]) -> None:
            run_env_script(client, script, check)

        scripts()
    a_valid_episode(url)


def schema_cases(app: Any, **fixed: Any) -> st.SearchStrategy[Any]:
    schema = schemathesis.openapi.from_dict(app.openapi())
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    return st.one_of(*(schema.as_strategy(mode, **fixed) for mode in modes), *(schema.as_strategy(m) for m in modes))


def fuzz_env_schema(url: str, examples: int, check: Check = no_server_error) -> None:
    cases = schema_cases(create_env_app("arith", max_tasks=200), path_parameters={"session_id": LIVE})
    with requests.Session() as http:

        @fuzz_settings(examples)
        @given(cases)
        def schema(case: Any) -> None:
            http.post(f"{url}/sessions", json={"session_id": LIVE})  # (again) after a case deleted it
            response = case.call(base_url=url, session=http, timeout=60)
            check(f"{case.method} {case.formatted_path} query={case.query!r} body={str(case.body)[:200]}", response)
            if case.method == "POST" and case.path == "/sessions" and response.status_code == 200:
                http.delete(f"{url}/sessions/{response.json()['session_id']}")

        schema()
        http.delete(f"{url}/sessions/{LIVE}")
    a_valid_episode(url)


def test_env_server_fuzzed_scripts(env_url: str) -> None:
    fuzz_env_scripts(env_url, EXAMPLES)


def test_env_server_fuzzed_from_its_schema(env_url: str) -> None:
    fuzz_env_schema(env_url, EXAMPLES)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_env_server_campaign(env_url: str) -> None:
    fuzz_env_scripts(env_url, CAMPAIGN)
    fuzz_env_schema(env_url, CAMPAIGN)


# ---- the policy server ---------------------------------------------------------------------
ARGUMENTS = often(st.fixed_dictionaries({"expression": EXPRESSION}).map(json.dumps), TEXT, JSON.map(json.dumps))
FUNCTION_CALL = st.fixed_dictionaries(
    {"name": maybe(often(st.sampled_from(["calc", "answer"]), TEXT))}, optional={"arguments": maybe(ARGUMENTS)}
)
PART = st.fixed_dictionaries(
    {"type": maybe(often(st.just("text"), st.sampled_from(["input_text", "image_url"])))}, optional={"text": LEAF}
)
MESSAGE = st.fixed_dictionaries(
    {"role": maybe(often(st.sampled_from(["user", "assistant"]), st.sampled_from(["system", "tool", "developer"])))},
    optional={
        "content": maybe(often(TEXT, st.lists(PART, max_size=2))),
        "tool_calls": maybe(
            often(
                st.lists(
                    st.fixed_dictionaries({"id": maybe(TEXT)}, optional={"function": maybe(FUNCTION_CALL)}), max_size=2
                ),
                LEAF,
                times=3,
            )
        ),
        "tool_call_id": maybe(TEXT),
        "name": maybe(TEXT),
    },
)
PARAMETERS = st.fixed_dictionaries(
    {"type": maybe(st.just("object"))},
    optional={
        "properties": maybe(st.dictionaries(TEXT, st.just({"type": "string"}) | JSON, max_size=2)),
        "required": JSON,
    },
)
TOOL = st.fixed_dictionaries(
    {"type": maybe(st.just("function"))},
    optional={
        "function": maybe(
            st.fixed_dictionaries(
                {"name": maybe(TEXT)}, optional={"description": maybe(TEXT), "parameters": maybe(PARAMETERS)}
            )
        )
    },
)
# what float32 turns to 0, or keeps as a denormal that overflows the logits it divides
TINY_FLOATS = st.sampled_from([0.0, -0.0, 5e-324, 1e-320, 1e-39, 1e-40, 1e-42, 1e-45, 1e-6])
SAMPLING = {
    "model": maybe(often(st.just("tiny"), TEXT)),
    "n": maybe(st.integers(min_value=1, max_value=3)),
    "temperature": maybe(often(st.floats(min_value=0, max_value=2), TINY_FLOATS, times=2)),
    "top_p": maybe(often(st.floats(min_value=0, max_value=1, exclude_min=True), TINY_FLOATS, times=2)),
    "stop": maybe(often(TEXT, st.lists(TEXT, max_size=2), times=1)),
    "stream": maybe(often(st.just(False), st.just(True))),
    "return_token_ids": maybe(st.booleans()),
    "return_tokens_as_token_ids": maybe(st.booleans()),
}
CHAT = st.fixed_dictionaries(
    {"messages": maybe(st.lists(MESSAGE, min_size=1, max_size=3))},
    optional={
        **SAMPLING,
        "tools": maybe(st.lists(TOOL, max_size=2)),
        "tool_choice": maybe(st.sampled_from(["auto", "none", "required"])),
        "max_tokens": maybe(st.integers(min_value=1, max_value=4)),
        "max_completion_tokens": maybe(st.integers(min_value=1, max_value=4)),
        "logprobs": maybe(st.booleans()),
        "top_logprobs": maybe(st.integers(min_value=0, max_value=20)),
    },
)
IDS = often(
    st.lists(st.integers(min_value=0, max_value=99), min_size=1, max_size=30),  # the tiny model has 100 ids
    st.lists(st.integers(min_value=-3, max_value=120), max_size=30),
    st.just([1] * 300),  # past the model's 256 positions
    times=2,
)
COMPLETION = st.fixed_dictionaries(
    {"prompt": maybe(st.one_of(TEXT, IDS, st.lists(TEXT, max_size=2), st.lists(IDS, max_size=2)))},
    optional={
        **SAMPLING,
        "max_tokens": maybe(st.integers(min_value=0, max_value=3)),
        "echo": maybe(st.booleans()),
        "logprobs": maybe(st.integers(min_value=0, max_value=20)),
        "prompt_logprobs": maybe(st.integers(min_value=0, max_value=20)),
        "add_special_tokens": maybe(st.booleans()),
    },
)


@dataclass(frozen=True)
class PolicyFixture:
    app: Any
    url: str  # the base URL, ending in /v1
    paths: list[str]  # load_weights paths worth trying: a real model, an empty directory, a file, missing


@pytest.fixture(scope="module")
def policy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyFixture]:
    model, tok = build_tiny(TINY, seed=0)
    root = tmp_path_factory.mktemp("fuzz-models")
    save_model(model, tok, root / "model")  # the same weights: a load that succeeds changes no answer
    (root / "empty").mkdir()
    (root / "file").write_text("not a model")
    paths = [str(root / name) for name in ("model", "empty", "file", "missing")]
    app = create_policy_app(LocalPolicy(model, PlainTextChat(tok), seed=0), model_name="tiny", default_max_tokens=4)
    with BackgroundServer(app) as server:
        yield PolicyFixture(app, server.url, paths)


def load_weights_calls(paths: list[str]) -> st.SearchStrategy[Call]:
    path = st.one_of(
        st.sampled_from([*paths, "/", ".", "/dev/null", "/proc/self", "~", "tiny"]),
        st.one_of(st.sampled_from([256, 1000]), st.integers(min_value=1, max_value=6000)).map(
            lambda n: "/tmp/" + "a" * n  # one name past 255 bytes: the OS refuses it
        ),
        st.integers(min_value=1, max_value=2500).map(lambda n: "/b" * n),  # a path past 4096
        TEXT,
    )
    body = st.fixed_dictionaries({"path": maybe(path)}, optional={"version": maybe(st.integers(min_value=-1))})
    return calls(st.just("POST"), st.just("/load_weights"), body_of(body))


def policy_calls(paths: list[str]) -> st.SearchStrategy[Call]:
    return st.one_of(
        calls(st.just("POST"), st.just("/chat/completions"), body_of(CHAT)),
        calls(st.just("POST"), st.just("/completions"), body_of(COMPLETION)),
        load_weights_calls(paths),
        calls(
            st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
            st.sampled_from(["/models", "/chat/completions", "/completions", "/load_weights", "/nope"]),
            st.none() | RAW,
        ),
    )


def a_valid_chat(url: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "1+2?"}], "max_tokens": 2, "logprobs": True}
    r = httpx.post(f"{url}/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and len(r.json()["safactory"]["choices"][0]["token_ids"]) == 2, r.text


def fuzz_policy_calls(server: PolicyFixture, examples: int, check: Check = no_server_error) -> None:
    with httpx.Client(base_url=server.url, timeout=120) as client:

        @fuzz_settings(examples)
        @given(st.lists(policy_calls(server.paths), min_size=1, max_size=2))
        def requests_(script: list[Call]) -> None:
            for call in script:
                check(str(call), send(client, call))
            models = client.get("/models")
            assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiny", models.text

        requests_()
    a_valid_chat(server.url)


def fuzz_policy_schema(server: PolicyFixture, examples: int, check: Check = no_server_error) -> None:
    cases = schema_cases(server.app)
    base = server.url.removesuffix("/v1")
    with requests.Session() as http:

        @fuzz_settings(examples)
        @given(cases)
        def schema(case: Any) -> None:
            response = case.call(base_url=base, session=http, timeout=120)
            check(f"{case.method} {case.formatted_path} body={str(case.body)[:200]}", response)

        schema()
    a_valid_chat(server.url)


def test_policy_server_fuzzed_requests(policy_server: PolicyFixture) -> None:
    fuzz_policy_calls(policy_server, EXAMPLES)


def test_policy_server_fuzzed_from_its_schema(policy_server: PolicyFixture) -> None:
    fuzz_policy_schema(policy_server, EXAMPLES)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_policy_server_campaign(policy_server: PolicyFixture) -> None:
    fuzz_policy_calls(policy_server, CAMPAIGN)
    fuzz_policy_schema(policy_server, CAMPAIGN)
