"""`mcp:<command ...>`: any MCP server spoken to over stdio, as a tool-using environment.

This file owns the MCP adapter: resolving `mcp:<command>` ids (the command is split
like a shell would, e.g. `mcp:uvx mcp-server-time` or `mcp:env KEY=1 python server.py`),
one server session per episode, mapping MCP tools and results to Safactory's tool
records, the JSONL task source and the answer check.

* Lifetime: `reset` starts the server process and opens a session (closing any
  previous one); `close` always ends it (the SDK closes stdin, then terminates and
  finally kills the process group). The session lives in a task of its own, so
  `reset`, `step` and `close` may run in different tasks. On POSIX the server runs
  under `mcp_guard.py`, which kills what it leaves behind in its process group (helpers
  it started) once it exits, also when it exits by itself. A server that cannot start
  or does not answer `initialize` within `startup_timeout_s` raises `McpServerError`
  from `reset`, with the command and the tail of the server's stderr.
* Tools: every listed MCP tool becomes a `ToolSpec`: its JSON Schema `inputSchema`
  as `parameters`; `read_only` from `readOnlyHint`; `destructive` from
  `destructiveHint`, defaulting as the MCP spec does (true unless read-only).
* Calls: each assistant tool call is one `tools/call`. Text content becomes the
  tool message (other content is named in brackets, structured content is used
  when there is no text); `isError` results, protocol errors, timeouts (the calls of one
  step share `call_timeout_s`, so a step stays within the agent's env timeout however
  many calls it makes), unknown tools and missing required arguments become tool
  messages starting with `error:` and are
  listed in `info["errors"]`. Nothing a server does raises out of `step`. When the
  connection to the server is lost the episode is truncated.
* Reward: MCP has none. Every episode also offers the pseudo-tool `answer(value)`
  (`submit_answer` when the server has its own `answer` tool). It ends the episode.
  When the task has an `answer` (in `task.data`), the reward is 1.0 if the value
  matches it and 0.0 otherwise, and `info["success"]` says which; a match ignores
  case, surrounding whitespace and a trailing full stop, compares numbers
  numerically, and a list of answers accepts any of them. Without an expected
  answer the value is recorded in `info["answer"]` with reward None, for a judge.
* Tasks: `McpTasks(tasks_path=...)`, or the file named by `SAFACTORY_MCP_TASKS`. One
  JSON object per line with `id`, `prompt` and optionally `split`, `answer`, `data`.
  A row without a split is put in `test` for about `test_percent`% of ids (by a hash
  of the id) and in `train` otherwise. A broken row is an error naming its line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from safactory.sim.env import EnvEntry, EnvSpec
from safactory.types import Message, Observation, StepResult, Task, ToolCall, ToolSpec

if TYPE_CHECKING:
    from safactory.sim.env import EnvRegistry

_GUARD = Path(__file__).with_name("mcp_guard.py")
SCHEME = "mcp"
ADAPTER_VERSION = "1"
TASKS_ENV_VAR = "SAFACTORY_MCP_TASKS"
ANSWER_TOOL_NAMES = ("answer", "submit_answer", "submit_final_answer")
CONNECTION_CLOSED = -32000  # JSON-RPC code the MCP SDK uses for a lost connection
_CLOSE_WAIT_S = 10.0
_ROW_KEYS = {"id", "prompt", "split", "answer", "data"}


class McpServerError(RuntimeError):
    """The MCP server could not be started or initialised."""


def parse_command(rest: str) -> list[str]:
    """Split the part after `mcp:` into argv; raises ValueError when empty or badly quoted."""
    try:
        argv = shlex.split(rest)
    except ValueError as exc:
        raise ValueError(f"cannot parse MCP server command {rest!r}: {exc}") from None
    if not argv:
        raise ValueError("empty MCP server command; use mcp:<command ...>, e.g. mcp:python -m mcp_server_time")
    return argv


def answer_tool(name: str) -> ToolSpec:
    return ToolSpec(
        name=name,
        description="Submit your final answer; this ends the episode.",
        parameters={
            "type": "object",
            "properties": {"value": {"type": "string", "description": "the final answer"}},
            "required": ["value"],
        },
        read_only=True,
    )


def tool_spec(tool: Mapping[str, Any]) -> ToolSpec:
    """Map one MCP tool (its wire form, camelCase keys) to a ToolSpec."""
    hints = tool.get("annotations") or {}
    read_only = hints.get("readOnlyHint") is True
    destructive_hint = hints.get("destructiveHint")
    destructive = False if read_only else (True if destructive_hint is None else bool(destructive_hint))
    schema = tool.get("inputSchema")
    if not isinstance(schema, dict):
        schema = {"type": "object", "properties": {}}
    description = tool.get("description") or tool.get("title") or hints.get("title") or ""
    return ToolSpec(
        name=str(tool["name"]),
        description=str(description),
        parameters=schema,
        read_only=read_only,
        destructive=destructive,
    )


def result_text(result: Mapping[str, Any], max_chars: int) -> tuple[str, bool]:
    """The text of a `tools/call` result (wire form) and whether it is an error result."""
    parts: list[str] = []
    for block in result.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind == "resource":
            resource = block.get("resource") or {}
            parts.append(str(resource.get("text") or f"[resource {resource.get('uri', '')}]"))
        elif kind == "resource_link":
            parts.append(f"[resource link {block.get('uri', '')}]")
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} {block.get('mimeType', '')}]".replace(" ]", "]"))
        else:
            parts.append(f"[{kind} content]")
    if not parts and result.get("structuredContent") is not None:
        parts.append(json.dumps(result["structuredContent"], ensure_ascii=False, sort_keys=True))
    text = "\n".join(parts).strip() or "(no output)"
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n[... {len(text) - max_chars} more characters cut]"
    return text, bool(result.get("isError"))


def _norm_answer(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return re.sub(r"\s+", " ", text.strip()).rstrip(".").strip().casefold()


def answer_matches(given: Any, expected: Any) -> bool:
    """Whether a submitted answer matches the expected one (or any of a list of them)."""
    if isinstance(expected, list):
        return any(answer_matches(given, e) for e in expected)
    g, e = _norm_answer(given), _norm_answer(expected)
    if g == e:
        return True
    try:
        gf, ef = float(g.replace(",", "")), float(e.replace(",", ""))
    except ValueError:
        return False
    return math.isfinite(gf) and math.isfinite(ef) and math.isclose(gf, ef, rel_tol=1e-9, abs_tol=1e-6)


def describe_exception(exc: BaseException) -> str:
    """A one-line description, looking inside exception groups (anyio task groups wrap errors)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _dump(model: Any) -> dict[str, Any]:
    """The wire form (camelCase keys) of an SDK model, whatever the SDK's major version."""
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


async def _list_tools(session: Any) -> list[dict[str, Any]]:
    from mcp.types import PaginatedRequestParams

    tools: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        if cursor is None:
            page = _dump(await session.list_tools())
        else:
            page = _dump(await session.list_tools(params=PaginatedRequestParams(cursor=cursor)))
        tools.extend(page.get("tools") or [])
        cursor = page.get("nextCursor")
        if not cursor:
            break
    return tools


@dataclass
class _Connection:
    """The session task of one server process and what it reported once ready."""

    ready: asyncio.Future[tuple[Any, dict[str, Any], list[dict[str, Any]]]]
    stop: asyncio.Event
    errlog: IO[str]
    task: asyncio.Task[None] | None = None
    lost: bool = False


class McpEnv:
    """One episode against a fresh MCP server process."""

    def __init__(
        self,
        command: str | Sequence[str],
        *,
        env_id: str | None = None,
        server_env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        max_turns: int = 16,
        startup_timeout_s: float = 20.0,
        call_timeout_s: float = 20.0,
        max_result_chars: int = 8000,
    ) -> None:
        self.argv = parse_command(command) if isinstance(command, str) else list(command)
        if not self.argv:
            raise ValueError("empty MCP server command")
        self.server_env = dict(server_env or {})
        self.cwd = cwd
        self.startup_timeout_s = startup_timeout_s
        self.call_timeout_s = call_timeout_s
        self.max_result_chars = max_result_chars
        self.spec = EnvSpec(
            id=env_id or f"{SCHEME}:{shlex.join(self.argv)}",
            version=ADAPTER_VERSION,
            tools=(answer_tool(ANSWER_TOOL_NAMES[0]),),
            max_turns=max_turns,
            description="An MCP server's tools (listed at reset) plus answer(value), which ends the episode.",
        )
        self.task: Task | None = None
        self.tools: list[ToolSpec] = []
        self.answer_name = ANSWER_TOOL_NAMES[0]
        self.turn = 0
        self.done = False
        self._conn: _Connection | None = None

    # ---- protocol --------------------------------------------------------------------
    async def reset(self, task: Task, seed: int) -> Observation:
        await self.close()
        self.task = task
        self.turn = 0
        self.done = False
        _session, init, listed = await self._start()
        self.tools = [tool_spec(t) for t in listed if t.get("name")]
        names = {t.name for t in self.tools}
        self.answer_name = next((n for n in ANSWER_TOOL_NAMES if n not in names), f"answer_{len(names)}")
        tools = [*self.tools, answer_tool(self.answer_name)]
        messages: list[Message] = []
        if init.get("instructions"):
            messages.append(Message(role="system", content=str(init["instructions"])))
        messages.append(Message(role="user", content=task.prompt))
        server = init.get("serverInfo") or {}
        info = {"server": {"name": server.get("name", ""), "version": server.get("version", "")}, "seed": seed}
        return Observation(messages=messages, tools=tools, info=info)

    async def step(self, action: Message) -> StepResult:
        if self.task is None or self._conn is None:
            raise RuntimeError("step() called before reset()")
        if self.done:
            return StepResult(
                messages=[Message(role="user", content="error: episode is over")],
                terminated=True,
                info={"errors": ["step after the episode ended"]},
            )
        self.turn += 1
        errors: list[str] = []
        messages: list[Message] = []
        outcome: dict[str, Any] = {}
        if not action.tool_calls:
            errors.append("no tool call")
            usage = ", ".join(t.name for t in [*self.tools, answer_tool(self.answer_name)])
            messages.append(Message(role="user", content=f"error: no tool call; available tools: {usage}"))
        deadline = asyncio.get_running_loop().time() + self.call_timeout_s  # the step's calls share it
        for call in action.tool_calls:
            if self.done or self._conn.lost:
                text = "error: not run; the episode ended" if self.done else "error: not run; server connection lost"
                errors.append(f"{call.name}: not run")
            else:
                text = await self._dispatch(call, errors, outcome, deadline)
            messages.append(Message(role="tool", content=text, tool_call_id=call.id, name=call.name))
        info: dict[str, Any] = {"errors": errors} if errors else {}
        if self.done:
            info.update(outcome.get("info", {}))
            return StepResult(messages=messages, reward=outcome.get("reward"), terminated=True, info=info)
        if self._conn.lost:
            info["server_lost"] = True
            return StepResult(messages=messages, reward=0.0, truncated=True, info=info)
        return StepResult(messages=messages, reward=0.0, truncated=self.turn >= self.spec.max_turns, info=info)

    async def close(self) -> None:
        """Stop the session and the server process; safe to call at any time, any number of times."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.stop.set()
        task = conn.task
        if task is not None:
            if not conn.ready.done():
                task.cancel()
            done, _ = await asyncio.wait({task}, timeout=_CLOSE_WAIT_S)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=_CLOSE_WAIT_S)
        if conn.ready.done() and not conn.ready.cancelled():
            conn.ready.exception()  # mark as retrieved
        conn.errlog.close()

    # ---- server session --------------------------------------------------------------
    async def _start(self) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        conn = _Connection(
            ready=loop.create_future(),
            stop=asyncio.Event(),
            errlog=tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace"),
        )
        conn.task = loop.create_task(self._serve(conn), name=f"mcp-session {self.argv[0]}")
        self._conn = conn
        command = shlex.join(self.argv)
        try:
            return await asyncio.wait_for(asyncio.shield(conn.ready), self.startup_timeout_s)
        except TimeoutError:
            tail = self._stderr_tail(conn)
            await self.close()
            raise McpServerError(
                f"MCP server `{command}` did not initialise within {self.startup_timeout_s:g}s{tail}"
            ) from None
        except Exception as exc:
            tail = self._stderr_tail(conn)
            await self.close()
            raise McpServerError(f"MCP server `{command}` failed to start: {describe_exception(exc)}{tail}") from None
        except BaseException:
            await asyncio.shield(self.close())
            raise

    async def _serve(self, conn: _Connection) -> None:
        """Own the stdio transport and the session for their whole life (anyio scopes stay in one task)."""
        try:
            from mcp import ClientSession, StdioServerParameters, stdio_client
        except ImportError:
            conn.ready.set_exception(McpServerError("the mcp: adapter needs the MCP SDK; `pip install mcp`"))
            return
        argv = self.argv if os.name != "posix" else [sys.executable, str(_GUARD), *self.argv]
        params = StdioServerParameters(
            command=argv[0],
            args=argv[1:],
            env=self.server_env or None,
            cwd=str(self.cwd) if self.cwd is not None else None,
        )
        try:
            async with AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(stdio_client(params, errlog=conn.errlog))
                session = await stack.enter_async_context(ClientSession(read, write))
                init = _dump(await session.initialize())
                tools = await _list_tools(session)
                if not conn.ready.done():
                    conn.ready.set_result((session, init, tools))
                await conn.stop.wait()
        except asyncio.CancelledError:
            if not conn.ready.done():
                conn.ready.cancel()
            raise
        except Exception as exc:  # reported to reset() before the session is ready, as a lost server after
            if not conn.ready.done():
                conn.ready.set_exception(exc)
            else:
                conn.lost = True

    async def _dispatch(self, call: ToolCall, errors: list[str], outcome: dict[str, Any], deadline: float) -> str:
        if call.name == self.answer_name:
            return self._answer(call, errors, outcome)
        spec = next((t for t in self.tools if t.name == call.name), None)
        if spec is None:
            known = ", ".join([t.name for t in self.tools] + [self.answer_name])
            errors.append(f"unknown tool {call.name!r}")
            return f"error: unknown tool {call.name!r}; available: {known}"
        missing = [p for p in spec.parameters.get("required", []) if p not in call.arguments]
        if missing:
            errors.append(f"{call.name}: missing {missing}")
            return f"error: {call.name} needs argument(s) {', '.join(missing)}"
        assert self._conn is not None
        session = self._conn.ready.result()[0]
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            errors.append(f"{call.name}: not run")
            return f"error: not run; this step's calls used up their {self.call_timeout_s:g}s"
        try:
            result = await asyncio.wait_for(session.call_tool(call.name, dict(call.arguments)), left)
        except TimeoutError:
            errors.append(f"{call.name}: timed out")
            return f"error: {call.name} timed out (this step's calls may take {self.call_timeout_s:g}s in all)"
        except Exception as exc:
            code = getattr(exc, "code", getattr(getattr(exc, "error", None), "code", None))
            if code == CONNECTION_CLOSED and "closed" in str(exc).lower():
                self._conn.lost = True
            errors.append(f"{call.name}: {describe_exception(exc)}")
            return f"error: {describe_exception(exc)}"
        text, is_error = result_text(_dump(result), self.max_result_chars)
        if is_error:
            errors.append(f"{call.name}: tool reported an error")
            return text if text.startswith("error") else f"error: {text}"
        return text

    def _answer(self, call: ToolCall, errors: list[str], outcome: dict[str, Any]) -> str:
        assert self.task is not None
        if not call.arguments:
            errors.append(f"{call.name}: missing ['value']")
            return f"error: {call.name} needs argument(s) value"
        value = call.arguments.get("value", next(iter(call.arguments.values())))
        self.done = True
        info: dict[str, Any] = {"answer": value if isinstance(value, str) else json.dumps(value)}
        if "answer" not in self.task.data:
            outcome.update(reward=None, info=info)
            return "answer recorded"
        correct = answer_matches(value, self.task.data["answer"])
        info["success"] = correct
        outcome.update(reward=1.0 if correct else 0.0, info=info)
        return "correct" if correct else "wrong"

    @staticmethod
    def _stderr_tail(conn: _Connection, chars: int = 1500) -> str:
        try:
            conn.errlog.flush()
            conn.errlog.seek(0)
            text = conn.errlog.read()
        except (OSError, ValueError):
            return ""
        text = text.strip()
        return f"\nserver stderr (tail):\n{text[-chars:]}" if text else ""


def id_split(task_id: str, test_percent: int) -> str:
    """Deterministic split of a task id without one: 'test' for about test_percent% of ids."""
    digest = hashlib.sha256(task_id.encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 100 < test_percent else "train"


@dataclass
class McpTasks:
    """Tasks of an MCP env, read from a JSONL file (`tasks_path`, else $SAFACTORY_MCP_TASKS)."""

    env_id: str = SCHEME
    tasks_path: str | Path | None = None
    test_percent: int = 20
    rows: list[Task] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        raw = self.tasks_path if self.tasks_path is not None else os.environ.get(TASKS_ENV_VAR)
        if not raw:
            raise ValueError(f"MCP tasks need a JSONL file: pass tasks_path=... (env option) or set {TASKS_ENV_VAR}")
        path = Path(raw).expanduser()
        if not path.is_file():
            raise ValueError(f"MCP tasks file {str(path)!r} does not exist")
        self.tasks_path = path
        seen: set[str] = set()
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    task = self._row(line, f"{path}:{lineno}")
                    if task.id in seen:
                        raise ValueError(f"{path}:{lineno}: duplicate task id {task.id!r}")
                    seen.add(task.id)
                    self.rows.append(task)

    def _row(self, line: str, where: str) -> Task:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: each line must be a JSON object")
        unknown = set(row) - _ROW_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_ROW_KEYS)}")
        task_id, prompt = row.get("id"), row.get("prompt")
        if not isinstance(task_id, str | int) or isinstance(task_id, bool) or str(task_id) == "":
            raise ValueError(f"{where}: 'id' must be a non-empty string or an integer")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string")
        data = row.get("data", {})
        if not isinstance(data, dict):
            raise ValueError(f"{where}: 'data' must be an object")
        split = row.get("split") or id_split(str(task_id), self.test_percent)
        if not isinstance(split, str):
            raise ValueError(f"{where}: 'split' must be a string")
        if "answer" in row:
            data = {**data, "answer": row["answer"]}
        return Task(id=str(task_id), env_id=self.env_id, split=split, prompt=prompt, data=data)

    def tasks(self, split: str, n: int) -> list[Task]:
        """The first n tasks of a split, in file order (fewer when the file has fewer)."""
        chosen = [t for t in self.rows if t.split == split][: max(n, 0)]
        if n > 0 and not chosen:
            splits = sorted({t.split for t in self.rows})
            raise ValueError(f"{self.tasks_path} has no {split!r} tasks; its splits: {splits}")
        return chosen


def make_entry(rest: str) -> EnvEntry:
    """The EnvEntry for `mcp:<command>`; tasks come from `entry.tasks(tasks_path=...)`."""
    argv = parse_command(rest)
    env_id = f"{SCHEME}:{rest.strip()}"
    factory = partial(McpEnv, argv, env_id=env_id)
    return EnvEntry(factory=factory, tasks=partial(McpTasks, env_id), expert=None, spec=factory().spec)


def register(registry: EnvRegistry) -> None:
    """Add the `mcp:` scheme to a registry."""
    registry.register_scheme(SCHEME, make_entry)
