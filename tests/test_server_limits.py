"""Client mistakes get a clear 4xx from both HTTP servers, never a 5xx, and nothing unbounded reaches the log.

Real uvicorn servers on loopback (the arith env server, the policy server on a tiny model), spoken to
with httpx. The first tests replay what an outside probe found answered with a 500: deep JSON in
`/tasks?options=`, a body that is not UTF-8, a step before reset, a 1000-character load_weights path.
The tokens: `serve-policy` and `serve-env` take theirs from the environment, in a real subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from safactory.policy.chat import PlainTextChat
from safactory.policy.local import LocalPolicy
from safactory.policy.models import TinyModelSpec, build_tiny, save_model
from safactory.policy.server import BackgroundServer, check_bind, create_policy_app
from safactory.request_limits import json_depth, parse_json_text, shorten
from safactory.sim.envs.arith import ArithTasks
from safactory.sim.serve import create_env_app
from tests.remote_server import free_port, running_server

ROOT = Path(__file__).resolve().parents[1]
TINY = TinyModelSpec(hidden_size=32, layers=1, heads=2, intermediate_size=64, max_positions=256)
USER = [{"role": "user", "content": "Compute 1+2."}]
NOT_UTF8 = b"\xff\xfe{\x80 not text \xc3"


# ---- fixtures and helpers ----------------------------------------------------------------
@pytest.fixture(scope="module")
def env_url() -> Iterator[str]:
    with running_server(create_env_app("arith", max_body_bytes=64 * 1024)) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    model, tok = build_tiny(TINY, seed=0)
    saved = tmp_path_factory.mktemp("models") / "v1"
    save_model(model, tok, saved)
    return model, tok, saved


@pytest.fixture(scope="module")
def policy_url(tiny_model: tuple[Any, Any, Path]) -> Iterator[str]:
    model, tok, _ = tiny_model
    app = create_policy_app(LocalPolicy(model, PlainTextChat(tok)), model_name="tiny", max_body_bytes=64 * 1024)
    with BackgroundServer(app) as server:
        yield server.url


def session(url: str) -> str:
    created = httpx.post(f"{url}/sessions")
    assert created.status_code == 200, created.text[:500]
    return created.json()["session_id"]


def arith_task() -> dict[str, Any]:
    return ArithTasks().tasks("train", 1)[0].model_dump(mode="json")


def answer(value: str) -> dict[str, Any]:
    call = {"id": "c0", "name": "answer", "arguments": {"value": value}}
    return {"action": {"role": "assistant", "content": "", "tool_calls": [call]}}


def env_error(response: httpx.Response, status: int, code: str) -> str:
    """The message of an env server error answer, after checking its status and shape."""
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert body["error"] == code and body["message"], body
    return body["message"]


def policy_error(response: httpx.Response, status: int) -> str:
    """The message of a policy server error answer (OpenAI's shape), after checking its status."""
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == status
    return error["message"]


def active_sessions(url: str) -> int:
    return httpx.get(f"{url}/health").json()["active_sessions"]


def chat_works(url: str) -> None:
    r = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"], r.text[:500]


@contextmanager
def captured_logs() -> Iterator[list[str]]:
    """Every record the server side logs meanwhile (uvicorn's loggers do not propagate to the root)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(logging.Formatter().format(record))

    handler = Collect(level=logging.DEBUG)
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "safactory")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


# ---- what the probe found ----------------------------------------------------------------
def test_deeply_nested_task_options_are_a_400_not_a_500(env_url: str) -> None:
    deep = httpx.get(f"{env_url}/tasks", params={"options": "[" * 1100})  # past Python's recursion limit
    assert "1100 levels deep" in env_error(deep, 400, "bad_request")
    probe = httpx.get(f"{env_url}/tasks", params={"options": "[" * 5000})  # the probe's: 15 KB percent-encoded
    assert "URL is" in env_error(probe, 414, "url_too_long")
    lone = httpx.get(f"{env_url}/tasks", params={"options": '{"\\ud800": 1}'})
    assert "surrogate" in env_error(lone, 400, "bad_request")
    assert len(httpx.get(f"{env_url}/tasks", params={"options": '{"seed": 3}', "n": 2}).json()["tasks"]) == 2


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", None])
def test_a_body_that_is_not_utf8_is_a_400(env_url: str, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    before = active_sessions(env_url)
    created = httpx.post(f"{env_url}/sessions", content=NOT_UTF8, headers=headers)
    assert "not UTF-8" in env_error(created, 400, "bad_request")
    assert active_sessions(env_url) == before  # nothing was created
    sid = session(env_url)
    for what in ("reset", "step"):
        refused = httpx.post(f"{env_url}/sessions/{sid}/{what}", content=NOT_UTF8, headers=headers)
        assert "not UTF-8" in env_error(refused, 400, "bad_request")
    assert httpx.post(f"{env_url}/sessions/{sid}/reset", json={"task": arith_task()}).status_code == 200
    httpx.delete(f"{env_url}/sessions/{sid}")


def test_a_text_body_that_does_not_validate_is_a_422_in_the_servers_own_shape(env_url: str) -> None:
    invalid = httpx.post(f"{env_url}/sessions", content="plain words", headers={"content-type": "text/plain"})
    assert "invalid request" in env_error(invalid, 422, "bad_request")
    unknown = httpx.get(f"{env_url}/no/such/path")
    env_error(unknown, 404, "not_found")


def test_protocol_order_errors_are_4xx(env_url: str) -> None:
    sid = session(env_url)
    early = httpx.post(f"{env_url}/sessions/{sid}/step", json=answer("1"))
    assert "reset" in env_error(early, 409, "reset_required")
    task = arith_task()
    assert httpx.post(f"{env_url}/sessions/{sid}/reset", json={"task": task}).status_code == 200
    again = httpx.post(f"{env_url}/sessions/{sid}/reset", json={"task": task, "seed": 1})
    assert again.status_code == 200  # resetting again starts the episode over
    done = httpx.post(f"{env_url}/sessions/{sid}/step", json=answer(task["data"]["answer"]))
    assert done.status_code == 200 and done.json()["reward"] == 1.0
    assert httpx.delete(f"{env_url}/sessions/{sid}").status_code == 200
    env_error(httpx.post(f"{env_url}/sessions/{sid}/step", json=answer("1")), 404, "unknown_session")
    env_error(httpx.post(f"{env_url}/sessions/{sid}/reset", json={"task": task}), 404, "unknown_session")
    env_error(httpx.delete(f"{env_url}/sessions/{sid}"), 404, "unknown_session")


def test_a_task_the_env_cannot_take_is_refused_at_reset(env_url: str) -> None:
    sid = session(env_url)
    task = {**arith_task(), "data": {"expression": "1+2"}}  # no answer: the answer step could not score it
    refused = httpx.post(f"{env_url}/sessions/{sid}/reset", json={"task": task})
    assert "data.answer" in env_error(refused, 400, "bad_task")
    env_error(httpx.post(f"{env_url}/sessions/{sid}/step", json=answer("3")), 409, "reset_required")
    lone = {**arith_task(), "prompt": "\ud800"}  # a lone surrogate: not text, cannot be sent back
    body = json.dumps({"task": lone}).encode()  # ensure_ascii: the surrogate travels as the escape \ud800
    assert "surrogate" in env_error(httpx.post(f"{env_url}/sessions/{sid}/reset", content=body), 400, "bad_request")
    httpx.delete(f"{env_url}/sessions/{sid}")


def test_load_weights_with_a_long_path_is_a_400_and_the_log_quotes_it_cut_short(
    policy_url: str, tiny_model: tuple[Any, Any, Path], tmp_path: Path
) -> None:
    long_name = "/tmp/" + "a" * 1000  # one name past the file system's 255 bytes: the OS refuses it
    with captured_logs() as lines:
        refused = httpx.post(f"{policy_url}/load_weights", json={"path": long_name})
        message = policy_error(refused, 400)
        assert "could not load" in message and "1005 characters" in message and len(message) < 600
        # a real model directory behind a long (valid) path loads, and the log line stays short
        deep = tmp_path.joinpath(*(["d" * 200] * 4))
        deep.parent.mkdir(parents=True)
        deep.symlink_to(tiny_model[2], target_is_directory=True)
        loaded = httpx.post(f"{policy_url}/load_weights", json={"path": str(deep)}, timeout=120)
        assert loaded.status_code == 200, loaded.text[:500]
    assert any("loaded" in line and "characters)" in line for line in lines), lines
    assert not any(long_name in line or str(deep) in line for line in lines)
    chat_works(policy_url)


def test_bad_load_weights_paths_are_clear_400s(policy_url: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    cases = {
        str(tmp_path / "missing"): "not a directory",
        str(tmp_path / "file"): "not a directory",
        str(tmp_path / "empty"): "not a model directory",
        str(tmp_path) + "/x\x00y": "NUL",
        "/" + "b/" * 2100: "at most 4096 characters",
    }
    for path, why in cases.items():
        message = policy_error(httpx.post(f"{policy_url}/load_weights", json={"path": path}), 400)
        assert why in message, message
    chat_works(policy_url)


# ---- limits on every request -------------------------------------------------------------
def test_body_and_url_limits_on_both_servers(env_url: str, policy_url: str) -> None:
    big = json.dumps({"task": {**arith_task(), "prompt": "x" * 70_000}}).encode()
    sid = session(env_url)
    for url, shape in ((f"{env_url}/sessions/{sid}/reset", env_error), (f"{policy_url}/chat/completions", None)):
        by_length = httpx.post(url, content=big, headers={"content-type": "application/json"})
        streamed = httpx.post(url, content=iter([big[:40_000], big[40_000:]]))  # chunked: no Content-Length
        long_url = httpx.post(url, params={"q": "x" * 9000}, json={})
        deep = httpx.post(url, content=b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}")
        for response, status in ((by_length, 413), (streamed, 413), (long_url, 414), (deep, 400)):
            if shape is env_error:
                env_error(response, status, {413: "body_too_large", 414: "url_too_long", 400: "bad_request"}[status])
            else:
                policy_error(response, status)
        assert "101 levels deep" in deep.text
    httpx.delete(f"{env_url}/sessions/{sid}")
    chat_works(policy_url)


def test_policy_server_client_mistakes_are_400s(policy_url: str) -> None:
    def chat(**fields: Any) -> httpx.Response:
        return httpx.post(f"{policy_url}/chat/completions", json={"model": "tiny", **fields}, timeout=60)

    assert "not UTF-8" in policy_error(httpx.post(f"{policy_url}/chat/completions", content=NOT_UTF8), 400)
    call_list = [*USER, {"role": "assistant", "content": "", "tool_calls": 5}]
    assert "tool_calls must be a list" in policy_error(chat(messages=call_list), 400)
    lone = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "\udc00"}]}).encode()
    assert "surrogate" in policy_error(httpx.post(f"{policy_url}/chat/completions", content=lone), 400)
    # the smallest top_p and temperature sample the top token instead of failing in the sampler
    for fields in ({"top_p": 5e-324}, {"temperature": 1e-40}):
        r = chat(messages=USER, max_tokens=3, **fields)
        assert r.status_code == 200 and r.json()["choices"], r.text[:500]
    r = httpx.post(f"{policy_url}/completions", json={"prompt": "1+2=", "max_tokens": 2, "top_p": 1e-320})
    assert r.status_code == 200, r.text[:500]


def test_the_json_checks() -> None:
    assert json_depth(b'{"a": "[[[[", "b": [1, {"c": []}]}') == 4
    assert json_depth(b'["\\"[[["]') == 1 and json_depth(b"") == 0
    assert parse_json_text('{"emoji": "\\ud83d\\ude00"}') == {"emoji": "\U0001f600"}  # a pair is fine
    with pytest.raises(ValueError, match="65 levels"):
        parse_json_text("[" * 65 + "]" * 65)
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_json_text("{oops")
    assert shorten("x" * 300).endswith("(300 characters)") and shorten("\ud800") == "\\ud800"


# ---- tokens from the environment ---------------------------------------------------------
def start_cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", "from safactory.cli import main; main()", *args]
    full_env = {**os.environ, "COLUMNS": "400", **env}  # one line per message: nothing wrapped
    return subprocess.Popen(
        command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for(url: str, proc: subprocess.Popen[str], deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("the server did not start")


def test_serve_policy_takes_its_token_from_the_environment() -> None:
    port = free_port()
    proc = start_cli("serve-policy", "--model", "tiny", "--port", str(port), env={"SAFACTORY_POLICY_TOKEN": "env-123"})
    try:
        url = f"http://127.0.0.1:{port}/v1/models"
        wait_for(url, proc)
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer env-123"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("command", "variable"),
    [(["serve-policy", "--model", "tiny"], "SAFACTORY_POLICY_TOKEN"), (["serve-env", "arith"], "SAFACTORY_ENV_TOKEN")],
)
def test_a_blank_token_from_the_environment_is_refused_before_serving(command: list[str], variable: str) -> None:
    from safactory.cli import app

    with socket.socket() as busy:  # were the token taken, the server would fail on this port: exit 1, not 2
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, [*command, "--port", str(port)], env={variable: "   ", "COLUMNS": "400"})
    assert result.exit_code == 2, result.output
    assert "--token" in result.output and variable in result.output, result.output


def test_a_blank_policy_token_is_refused() -> None:
    with pytest.raises(ValueError, match="blank"):
        check_bind("127.0.0.1", "  ")
