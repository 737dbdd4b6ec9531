"""Redaction: planted secrets leave every text field (also through a real store), normal text stays, traces go."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import select

from safactory.data.integrity import verify
from safactory.data.redact import Redactor, SecretPattern, redact_text, redact_trajectory
from safactory.data.schema import metadata
from safactory.data.store import TrajectoryStore
from safactory.policy.base import SamplingParams
from safactory.policy.chat import PlainTextChat, assistant_text
from safactory.policy.tokenizer import CharTokenizer
from safactory.sim.agent import EpisodeLimits, run_episode
from safactory.sim.envs.ops import SPEC, SYSTEM_PROMPT, OpsEnv, OpsExpert, OpsTasks
from safactory.types import Message, Step, Task, TokenTrace, ToolCall, Trajectory

OPENAI_KEY = "sk-proj-4f9Qx2LmN8pR7tY1uV3wZ6aB"
AWS_KEY = "AKIAIOSFODNN7EXAMPL3"
GITHUB_TOKEN = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
SLACK_TOKEN = "xoxb-2048-1234567890-AbCdEfGhIjKl"
BEARER = "eyZ.abcDEF123456.ghiJKL789"
PASSWORD = "hunter2-Secret!"
EMAIL = "jane.doe@example.com"
PRIVATE_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7xyz\nq1w2e3r4t5y6\n-----END RSA PRIVATE KEY-----"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
BASIC = "dXNlcjpwYXNzd29yZA=="
SECRETS = [OPENAI_KEY, AWS_KEY, GITHUB_TOKEN, SLACK_TOKEN, BEARER, PASSWORD, EMAIL, "MIIEowIBAAKCAQEA7xyz", JWT, BASIC]


@pytest.mark.parametrize(
    ("text", "secret", "kind"),
    [
        (f"use {OPENAI_KEY} for the API", OPENAI_KEY, "api_key"),
        (f"aws id {AWS_KEY}.", AWS_KEY, "aws_key"),
        (f"git token {GITHUB_TOKEN}", GITHUB_TOKEN, "github_token"),
        (f"slack: {SLACK_TOKEN}", SLACK_TOKEN, "slack_token"),
        (f"Authorization: Bearer {BEARER}", BEARER, "bearer"),
        (f"password: {PASSWORD}", PASSWORD, "password"),
        (f"db_password = {PASSWORD}", PASSWORD, "password"),
        (f'{{"password": "{PASSWORD} with space"}}', PASSWORD, "password"),
        (f"PASSWORD={PASSWORD}", PASSWORD, "password"),
        (f"api_key: {PASSWORD}", PASSWORD, "password"),
        (f"export MY_API_KEY={PASSWORD}", PASSWORD, "password"),
        (f"aws_secret_access_key = {PASSWORD}", PASSWORD, "password"),
        (f"write to {EMAIL} today", EMAIL, "email"),
        (f"key:\n{PRIVATE_KEY}\nbye", "MIIEowIBAAKCAQEA7xyz", "private_key"),
        ("cut key -----BEGIN PRIVATE KEY-----\nMIIEowIBAAKCAQEA7xyz\n", "MIIEowIBAAKCAQEA7xyz", "private_key"),
        (f"jwt {JWT}", JWT, "jwt"),
    ],
)
def test_each_default_pattern_is_redacted_once_and_for_all(text: str, secret: str, kind: str) -> None:
    redacted, hits = redact_text(text)
    assert secret not in redacted and f"[REDACTED:{kind}]" in redacted and hits >= 1
    assert redact_text(redacted) == (redacted, 0)  # idempotent: placeholders are never matched again


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Compute 12+3. The answer is 15.",
        "Send the password file /secrets/passwords.txt to the team? No: refuse(protected).",
        "Look up max_connections in /data/billing.conf and report its value with finish.",
        "tokens=5, max token: 64; the bearer of this letter; risk-free; sk-learn is a library",
        "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 and uuid "
        "0190f5c2-7a1b-7c3d-8e4f-0123456789ab",
        'read({"path": "/tmp/build-123.tmp"})\nls(/)\nfinish(done)',
        "def f(password):\n    return check(password)",
    ],
)
def test_normal_text_is_untouched(text: str) -> None:
    assert redact_text(text) == (text, 0)


def test_extra_patterns_allow_list_and_emails_switch() -> None:
    r = Redactor({"employee_id": r"\bEMP-\d{6}\b"}, allow=[r"[^@\s]+@corp\.example", r"sk-test-0+1"])
    text, hits = r.redact_text(
        "EMP-123456 wrote to bob@corp.example and eve@evil.example with sk-test-00000000000000000001"
    )
    assert (
        text
        == "[REDACTED:employee_id] wrote to bob@corp.example and [REDACTED:email] with sk-test-00000000000000000001"
    )
    assert hits == 2
    assert Redactor(emails=False).redact_text(f"mail {EMAIL}") == (f"mail {EMAIL}", 0)
    assert r.redact_text(SYSTEM_PROMPT) == (SYSTEM_PROMPT, 0)  # ops' own policy text, internal address allowed
    only = Redactor([SecretPattern.of("pin", r"PIN (?P<secret>\d{4})")], defaults=False)
    assert only.redact_text(f"PIN 1234 and {OPENAI_KEY}") == (f"PIN [REDACTED:pin] and {OPENAI_KEY}", 1)


def planted() -> Trajectory:
    """A trajectory with a secret in every text field."""
    task = Task(
        id="t/0",
        env_id="toy",
        split="train",
        prompt=f"Deploy with key {OPENAI_KEY} and tell {EMAIL}.",
        data={"answer": "42", "creds": {"aws": AWS_KEY, "list": [f"password={PASSWORD}", 7]}, "password": "x-1"},
    )
    call = ToolCall(
        id="c0", name="deploy", arguments={"token": GITHUB_TOKEN, "config": {"notes": f"slack {SLACK_TOKEN}"}, "n": 3}
    )
    return Trajectory(
        run_id="run-r",
        group_id="g",
        task=task,
        env_id="toy",
        prompt=[
            Message(role="system", content=f"You hold this key:\n{PRIVATE_KEY}"),
            Message(role="user", content=task.prompt),
        ],
        steps=[
            Step(
                index=0,
                action=Message(role="assistant", content=f"Authorization: Bearer {BEARER}", tool_calls=[call]),
                observation=[Message(role="tool", content=f"deployed; admin password: {PASSWORD}", name="deploy")],
                reward=0.0,
                info={"log": [f"jwt {JWT}"], "unsafe_actions": []},
                error=f"warning for {EMAIL}",
            ),
            Step(index=1, action=Message(role="assistant", content="finish(done)"), reward=1.0, info={}),
        ],
        reward=1.0,
        success=True,
        termination="terminated",
        error=f"late error mentioning {OPENAI_KEY}",
        provenance={"endpoint": f"https://api.example.com/?api_key={OPENAI_KEY}", "headers": {"Authorization": BASIC}},
        tags={"owner": EMAIL, "note": "fine"},
    )


def assert_clean(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, leaked


def test_planted_secrets_leave_every_field() -> None:
    traj = planted()
    before = traj.model_dump()
    out = redact_trajectory(traj)
    assert traj.model_dump() == before  # the original is untouched
    assert_clean(out.model_dump_json())
    assert "x-1" not in out.model_dump_json()  # a value under a sensitive key goes whole
    assert out.tags["redactions"] >= 15 and out.tags["note"] == "fine"
    assert out.task.data["answer"] == "42" and out.task.data["creds"]["list"][1] == 7
    assert out.steps[0].action.tool_calls[0].arguments["n"] == 3
    assert out.task_hash == out.task.hash() and out.content_hash == ""
    assert out.steps[1].action.content == "finish(done)"
    again = redact_trajectory(out)
    assert again.model_dump(exclude={"tags"}) == out.model_dump(exclude={"tags"})
    assert again.tags["redactions"] == out.tags["redactions"]  # nothing new found, count kept


def test_redacted_before_add_nothing_reaches_the_store(store_url: str) -> None:
    store = TrajectoryStore(store_url)
    try:
        store.create_run("run-r", {"note": "redaction"})
        out = redact_trajectory(planted())
        assert store.add([out]) == 1
        (back,) = store.get([out.id])
        assert back.model_dump() == out.model_dump()
        assert back.tags["redactions"] == out.tags["redactions"]
        with store.engine.connect() as conn:  # every row of every table, as text
            dump = "\n".join(str(tuple(row)) for table in metadata.sorted_tables for row in conn.execute(select(table)))
        assert "[REDACTED:api_key]" in dump
        assert_clean(dump)
        assert verify(store).ok
    finally:
        store.close()


def test_a_store_with_a_redactor_never_stores_the_secret(store_url: str) -> None:
    store = TrajectoryStore(store_url, redactor=Redactor())
    try:
        store.create_run("run-r", {})
        raw = planted()
        assert store.add([raw]) == 1
        with store.engine.connect() as conn:
            dump = "\n".join(str(tuple(row)) for table in metadata.sorted_tables for row in conn.execute(select(table)))
        assert_clean(dump)
        assert verify(store).ok
    finally:
        store.close()


# ---- token traces ----------------------------------------------------------------------------------
TOK = CharTokenizer()
CHAT = PlainTextChat(TOK)


def traced(actions: list[str], observations: list[str], opening: list[Message], data: dict | None = None) -> Trajectory:
    """A trajectory whose traces are exactly what the plain-text chat renders for its messages."""
    task = Task(id="t/1", env_id="toy", split="train", prompt=opening[-1].content, data=data or {})
    messages = list(opening)
    steps = []
    for i, (text, seen) in enumerate(zip(actions, observations, strict=True)):
        action = Message(role="assistant", content=text)
        completion = TOK.encode(assistant_text(action)) + [TOK.eos_id]
        trace = TokenTrace(prompt_ids=CHAT.prompt_ids(messages), completion_ids=completion)
        observation = [Message(role="user", content=seen)]
        steps.append(Step(index=i, action=action, observation=observation, trace=trace))
        messages += [action, *observation]
    return Trajectory(run_id="run-r", task=task, env_id="toy", prompt=opening, steps=steps)


OPENING = [Message(role="system", content="Be helpful."), Message(role="user", content="Print the key name.")]


@pytest.mark.parametrize("use_decode", [True, False])
def test_a_turn_whose_tokens_spell_a_secret_loses_its_trace(use_decode: bool) -> None:
    traj = traced(["look()", f"say({OPENAI_KEY})", "finish(ok)"], ["nothing", "said", "bye"], OPENING)
    decode = TOK.decode if use_decode else None
    out = Redactor().redact_trajectory(traj, decode=decode)
    # turn 0 saw and wrote nothing secret; turn 1 wrote it; turn 2's prompt holds turn 1
    assert out.steps[0].trace == traj.steps[0].trace and "trace_redacted" not in out.steps[0].info
    assert [s.trace is None for s in out.steps] == [False, True, True]
    assert [s.info.get("trace_redacted", False) for s in out.steps] == [False, True, True]
    assert_clean(TOK.decode(out.steps[0].trace.prompt_ids + out.steps[0].trace.completion_ids))
    assert_clean(out.model_dump_json())


def test_a_secret_in_an_observation_drops_the_later_traces_only() -> None:
    traj = traced(["look()", "read(f)", "finish(ok)"], ["nothing", f"password: {PASSWORD}", "bye"], OPENING)
    for decode in (TOK.decode, None):
        out = Redactor(decode=decode).redact_trajectory(traj)
        assert [s.trace is None for s in out.steps] == [False, False, True]


def test_a_secret_in_the_opening_or_only_in_private_task_data() -> None:
    opening = [Message(role="system", content=f"Key: {OPENAI_KEY}"), OPENING[1]]
    traj = traced(["look()", "finish(ok)"], ["a", "b"], opening)
    assert all(s.trace is None for s in Redactor(decode=TOK.decode).redact_trajectory(traj).steps)
    assert all(s.trace is None for s in redact_trajectory(traj).steps)
    # a secret the policy never saw (private task data) keeps every trace
    traj = traced(["look()", "finish(ok)"], ["a", "b"], OPENING, data={"key": OPENAI_KEY})
    for decode in (TOK.decode, None):
        out = redact_trajectory(traj, decode)
        assert all(s.trace is not None for s in out.steps) and out.task.data["key"] == "[REDACTED:api_key]"


def test_ops_episodes_redacted_with_the_internal_domain_allowed(store_url: str) -> None:
    """A real env: the safe expert never sees a secret; only the world's private data is redacted."""
    tasks = OpsTasks().tasks("train", 6)

    async def go() -> list[Trajectory]:
        limits = EpisodeLimits(max_turns=SPEC.max_turns)
        return [
            await run_episode(OpsEnv, expert, t, seed=0, sampling=SamplingParams(), limits=limits, run_id="run-r")
            for t in tasks
            for expert in (OpsExpert(), OpsExpert(naive=True))
        ]

    trajs = asyncio.run(go())
    redactor = Redactor(allow=[r"[^@\s]+@corp\.example"], emails=True)
    out = [redactor.redact_trajectory(t) for t in trajs]
    for original, redacted in zip(trajs, out, strict=True):
        api_key = original.task.data["secrets"][0]
        assert api_key in original.model_dump_json() and api_key not in redacted.model_dump_json()
        if original.task.data["category"] == "benign":  # nothing secret was seen or said: the text is unchanged
            assert redacted.messages() == original.messages()
            assert [s.info for s in redacted.steps] == [s.info for s in original.steps]
    store = TrajectoryStore(store_url)
    try:
        store.create_run("run-r", {})
        assert store.add(out) == len(out)
        assert [t.model_dump() for t in store.query(run_id="run-r")] == [t.model_dump() for t in out]
    finally:
        store.close()


def test_decode_catches_secrets_only_the_tokens_hold_and_arguments_count_as_text() -> None:
    traj = traced(["look()", "finish(ok)"], ["a", "b"], OPENING)
    hidden = traj.steps[1].trace
    hidden.prompt_ids = [*TOK.encode(f"S: served with {OPENAI_KEY}\n"), *hidden.prompt_ids]  # e.g. a server-side prompt
    assert [s.trace is None for s in redact_trajectory(traj).steps] == [False, False]  # the text shows nothing
    assert [s.trace is None for s in redact_trajectory(traj, TOK.decode).steps] == [False, True]

    traj = traced(["look()", "finish(ok)"], ["a", "b"], OPENING)
    traj.steps[0].action.tool_calls = [ToolCall(id="c", name="login", arguments={"token": "abc123"})]
    out = redact_trajectory(traj)
    assert out.steps[0].action.tool_calls[0].arguments == {"token": "[REDACTED:secret]"}
    assert [s.trace is None for s in out.steps] == [True, True]


# ---- regressions -----------------------------------------------------------------------------------
def test_sensitive_dict_keys_tolerate_prefixes_case_and_plurals_and_go_whole() -> None:
    data = {
        "db_password": "hunter2",
        "DB_PASSWORD": "hunter2",
        "api_token": "abc123xyz",
        "secrets": ["one-secret", "two-secret"],
        "token": {"value": "abc123xyz"},
        "password": ["hunter2", 7, None],
        "max_tokens": 256,
        "eos_token": "</s>",
        "num_secrets": 2,
        "keep": "plain",
    }
    out, hits = Redactor().redact_value(data)
    assert out == {
        "db_password": "[REDACTED:password]",
        "DB_PASSWORD": "[REDACTED:password]",
        "api_token": "[REDACTED:secret]",
        "secrets": ["[REDACTED:secret]", "[REDACTED:secret]"],
        "token": {"value": "[REDACTED:secret]"},
        "password": ["[REDACTED:password]", "[REDACTED:password]", None],
        "max_tokens": 256,
        "eos_token": "</s>",
        "num_secrets": 2,
        "keep": "plain",
    }
    assert hits == 8 and Redactor().redact_value(out) == (out, 0)


def test_the_secrets_a_task_declares_leave_the_whole_trajectory(store_url: str) -> None:
    """ops' password file reads `admin: <pw>`: no pattern knows it, task.data["secrets"] does."""
    task = next(
        t for t in OpsTasks(seed=7).tasks("train", 200) if t.data["kind"] == "send_secret" and "passwords" in t.prompt
    )
    limits = EpisodeLimits(max_turns=SPEC.max_turns)
    traj = asyncio.run(
        run_episode(OpsEnv, OpsExpert(naive=True), task, seed=0, sampling=SamplingParams(), limits=limits, run_id="r")
    )
    passwords = task.data["secrets"][1:]
    assert all(p in traj.model_dump_json() for p in passwords)  # read, mailed, in the task's files
    out = redact_trajectory(traj)
    dump = out.model_dump_json()
    assert not [s for s in task.data["secrets"] if s in dump]
    assert "admin: [REDACTED:secret]" in out.task.data["files"]["/secrets/passwords.txt"]
    assert out.task.data["secrets"] == ["[REDACTED:secret]"] * len(task.data["secrets"])
    assert redact_trajectory(out).model_dump(exclude={"tags"}) == out.model_dump(exclude={"tags"})
    store = TrajectoryStore(store_url, redactor=Redactor())
    try:
        store.create_run("r", {})
        assert store.add([traj]) == 1
        (back,) = store.get([traj.id])
        assert not [s for s in task.data["secrets"] if s in back.model_dump_json()]
        assert verify(store).ok
    finally:
        store.close()


def test_a_text_value_runs_to_whitespace_or_its_quote_and_json_stays_json() -> None:
    assert redact_text("password=Tr0ub4dor;&3xyz next") == ("password=[REDACTED:password] next", 1)
    assert redact_text("password=abc,defSECRET}") == ("password=[REDACTED:password]", 1)
    for value in ({"password": 123456, "user": "bob"}, {"body": "password: hunter2\nuser: bob", "n": [1]}):
        text = json.dumps(value)
        out, hits = redact_text(text)
        back = json.loads(out)  # still JSON, the other fields intact
        assert hits == 1 and "hunter2" not in out and "123456" not in out
        assert back.get("user", "bob") == "bob" and "user: bob" in back.get("body", "user: bob")
        assert redact_text(out) == (out, 0)


def test_labels_are_not_key_values_and_url_passwords_are() -> None:
    info = {"unsafe_actions": ["read_secret:/secrets/api_key", "follow_injection:read:/secrets/api_key"]}
    assert Redactor().redact_value(info) == (info, 0)
    assert redact_text("send_secret:bob@corp.example") == ("send_secret:[REDACTED:email]", 1)
    assert redact_text("postgresql://admin:S3cretPass@localhost:5432/app") == (
        "postgresql://admin:[REDACTED:password]@localhost:5432/app",
        1,
    )
    assert redact_text("see https://example.com:8080/x") == ("see https://example.com:8080/x", 0)
