"""The Environment protocol, its spec, a registry, and a base class for tool-using envs.

An environment is one instance per episode: `reset(task, seed)`, then `step(action)`
until it terminates, then `close()`. It owns its own state, never the chat history.
`ToolEnvironment` turns malformed or unknown tool calls into error observations so
that no bad action ever raises out of an episode.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from safactory.types import Message, Observation, StepResult, Task, ToolCall, ToolSpec


@dataclass(frozen=True)
class EnvSpec:
    """Static description of an environment."""

    id: str
    version: str
    tools: tuple[ToolSpec, ...] = ()
    max_turns: int = 8
    splits: tuple[str, ...] = ("train", "test")
    description: str = ""
    # `reset` re-initialises all state: a rollout worker may play another episode on an instance
    # (`safactory.sim.env_pool`). It speaks of instances, not of the env: not compared, not on the wire.
    reusable: bool = field(default=False, compare=False)


@runtime_checkable
class Environment(Protocol):
    spec: EnvSpec

    async def reset(self, task: Task, seed: int) -> Observation: ...

    async def step(self, action: Message) -> StepResult: ...

    async def close(self) -> None: ...


def draw_tasks(
    spec: EnvSpec,
    split: str,
    n: int,
    seed: object,
    propose: Callable[[random.Random], tuple[str, str, Any]],
    build: Callable[[random.Random, Any, int], Task],
) -> list[Task]:
    """`n` distinct tasks of `split`, deterministic by (`seed`, `split`).

    `propose(rng)` draws a candidate as (key, its split, payload); candidates of another
    split or with a key already drawn are skipped, so splits never share a task. For each
    accepted one, `build(rng, payload, index)` makes the Task.
    """
    if split not in spec.splits:
        raise ValueError(f"{spec.id} has splits {spec.splits}, not {split!r}")
    rng = random.Random(f"{seed}:{split}")
    seen: set[str] = set()
    out: list[Task] = []
    for _ in range(200 * n + 1000):
        if len(out) >= n:
            break
        key, candidate_split, payload = propose(rng)
        if key in seen or candidate_split != split:
            continue
        seen.add(key)
        out.append(build(rng, payload, len(out)))
    if len(out) < n:
        raise ValueError(f"cannot draw {n} distinct {split} tasks of {spec.id} from this distribution")
    return out


class TaskSource(Protocol):
    """Deterministic task lists per split."""

    def tasks(self, split: str, n: int) -> list[Task]: ...


@dataclass
class EnvEntry:
    """What the registry knows about one environment id."""

    factory: Callable[..., Environment]
    tasks: Callable[..., TaskSource]
    expert: Callable[..., Any] | None = None
    spec: EnvSpec | None = None


SchemeFactory = Callable[[str], EnvEntry]


@dataclass
class EnvRegistry:
    """Maps env ids to factories.

    Built-ins register via `register`; adapters register a scheme via
    `register_scheme` and resolve ids such as `gym:Taxi-v3` or `http://host:port`
    (`<scheme>:<rest>`, the rest passed to the scheme's factory). Installed packages
    add theirs through the entry-point group `safactory.envs` (each entry point is a
    callable taking the registry). A plugin that fails to load is skipped with a
    warning (the others still load) and named in the error for an unknown env id.
    """

    entries: dict[str, EnvEntry] = field(default_factory=dict)
    schemes: dict[str, SchemeFactory] = field(default_factory=dict)
    _plugins_loaded: bool = False
    plugin_errors: dict[str, str] = field(default_factory=dict)  # plugin name -> why it failed to load

    def register(self, env_id: str, entry: EnvEntry) -> None:
        if env_id in self.entries:
            raise ValueError(f"environment {env_id!r} is already registered")
        self.entries[env_id] = entry

    def register_scheme(self, scheme: str, factory: SchemeFactory) -> None:
        if scheme in self.schemes:
            raise ValueError(f"environment scheme {scheme!r} is already registered")
        self.schemes[scheme] = factory

    def get(self, env_id: str) -> EnvEntry:
        self._load_plugins()
        if env_id in self.entries:
            return self.entries[env_id]
        scheme, sep, rest = env_id.partition(":")
        if sep and scheme in self.schemes:
            return self.schemes[scheme](rest)
        known = ", ".join(sorted(self.entries) + [f"{s}:..." for s in sorted(self.schemes)]) or "none"
        message = f"unknown environment {env_id!r}; known: {known}"
        if self.plugin_errors:
            failed = "; ".join(f"{name} ({error})" for name, error in self.plugin_errors.items())
            message += f"; env plugins that failed to load: {failed}"
        raise KeyError(message)

    def ids(self) -> list[str]:
        self._load_plugins()
        return sorted(self.entries)

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # set first: a plugin may look envs up while it registers
        for ep in entry_points(group="safactory.envs"):
            try:
                ep.load()(self)
            except Exception as exc:  # one broken plugin must not hide the others
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.plugin_errors[ep.name] = error
                warnings.warn(f"safactory env plugin {ep.name!r} failed to load: {error}", RuntimeWarning, stacklevel=3)


ToolHandler = Callable[..., Awaitable[str] | str]


class ToolError(Exception):
    """Raised by a tool handler for an error the agent should see as an observation."""


class ToolEnvironment:
    """Base class for environments whose actions are tool calls.

    Subclasses set `spec`, implement `on_reset`, and define one method `tool_<name>`
    per tool. `reset` re-initialises the base's own state (task, turn, done, rng; the final
    reward and info are set afresh by every step), so a subclass whose `on_reset` rebuilds
    all of its own state may declare its spec `reusable`. Every call is validated against the
    tool's schema; problems become tool messages starting with "error:" and are recorded in
    `info["errors"]`.
    """

    spec: EnvSpec

    def __init__(self) -> None:
        self.task: Task | None = None
        self.turn = 0
        self.done = False
        self.rng = random.Random(0)

    async def reset(self, task: Task, seed: int) -> Observation:
        self.task = task
        self.turn = 0
        self.done = False
        self.rng = random.Random(seed)
        messages = await self.on_reset(task)
        return Observation(messages=messages, tools=list(self.spec.tools))

    async def on_reset(self, task: Task) -> list[Message]:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    def finish(self, reward: float, info: dict[str, Any] | None = None) -> None:
        """Called by a tool handler to end the episode with a reward."""
        self.done = True
        self._final_reward = reward
        self._final_info = info or {}

    def begin_step(self) -> StepResult | None:
        """Shared start of every step (`begin_step` below)."""
        return begin_step(self)

    async def step(self, action: Message) -> StepResult:
        if (over := self.begin_step()) is not None:
            return over
        self._final_reward = 0.0
        self._final_info = {}
        errors: list[str] = []
        messages: list[Message] = []
        if not action.tool_calls:
            errors.append("no tool call")
            usage = " or ".join(f"{t.name}(...)" for t in self.spec.tools)
            messages.append(Message(role="user", content=f"error: no tool call; use {usage}"))
        for call in action.tool_calls:
            if self.done:
                break
            text = await self._dispatch(call, errors)
            messages.append(Message(role="tool", content=text, tool_call_id=call.id, name=call.name))
        info: dict[str, Any] = {"errors": errors} if errors else {}
        if self.done:
            info.update(self._final_info)
            return StepResult(messages=messages, reward=self._final_reward, terminated=True, info=info)
        truncated = self.turn >= self.spec.max_turns
        return StepResult(messages=messages, reward=0.0, truncated=truncated, info=info)

    async def _dispatch(self, call: ToolCall, errors: list[str]) -> str:
        spec = next((t for t in self.spec.tools if t.name == call.name), None)
        if spec is None:
            known = ", ".join(t.name for t in self.spec.tools)
            errors.append(f"unknown tool {call.name!r}")
            return f"error: unknown tool {call.name!r}; available: {known}"
        missing = [p for p in spec.parameters.get("required", []) if p not in call.arguments]
        if missing:
            errors.append(f"{call.name}: missing {missing}")
            return f"error: {call.name} needs argument(s) {', '.join(missing)}"
        handler = getattr(self, f"tool_{call.name}")
        try:
            result = handler(**call.arguments)
            if isinstance(result, Awaitable):
                result = await result
            return str(result)
        except ToolError as exc:
            errors.append(f"{call.name}: {exc}")
            return f"error: {exc}"
        except TypeError as exc:
            errors.append(f"{call.name}: bad arguments ({exc})")
            return f"error: bad arguments for {call.name}"


def begin_step(env: Any) -> StepResult | None:
    """The start of a step for an env with `task`, `done` and `turn`: refuses a step before reset,
    answers a step after the end with an error result (returned), else counts the turn and returns None."""
    if env.task is None:
        raise RuntimeError("step() called before reset()")
    if env.done:
        return StepResult(
            messages=[Message(role="user", content="error: episode is over")],
            terminated=True,
            info={"errors": ["step after termination"]},
        )
    env.turn += 1
    return None
