"""`gym:<id>`: any Gymnasium environment with a Discrete action space, as a text environment.

This file owns the Gymnasium adapter: resolving `gym:<id>[?key=value&...]` ids (the
query goes to `gymnasium.make` as keyword arguments, values parsed as JSON where they
can be, e.g. `gym:FrozenLake-v1?is_slippery=false`), rendering observations as text,
parsing actions, seed-based task lists and a planning expert for deterministic
tabular envs.

* Observations: the env's `ansi` render when it has one (colour codes removed; a
  highlighted cell, such as Taxi's cab or FrozenLake's player, becomes `@`), a short
  description for the toy-text envs, and always a line `observation: <value>`.
* Actions: a tool call `act(action)` with an action number or name (`act(2)`,
  `act(east)`), or the bare token as the assistant's content (`2`, `east`). Names are
  known for the toy-text and classic-control envs, and taken from
  `get_action_meanings()` where an env has it (Atari).
* Faithfulness: a valid action is exactly one `env.step`; the step's reward,
  `terminated` and `truncated` are Gymnasium's own. The episode is reset with the
  task's seed, so the same task and actions give the same episode as the raw env.
  The runner's per-episode seed is ignored when the task has one (group members of a
  task see the same episode).
* Invalid actions (unknown name, out of range, no action, unknown tool) are error
  observations: no env step is taken, the reward is `invalid_action_reward` (default
  -1.0, so that doing nothing valid never pays better than acting in envs whose steps
  cost -1), and `info["errors"]` records why.
* Tasks: a task is a seed. Train seeds are `seed + i`, test seeds
  `split_stride + seed + i`, so the splits never share a seed (they may share a start
  state in envs with few of them, e.g. Taxi's 300).
* `EnvSpec.max_turns` is the env's `max_episode_steps`, or 100 when it has none.
* Success: for envs whose reward does not tell (see `SUCCESS_ON`) the ending step sets
  `info["success"]`: CliffWalking, MountainCar and Acrobot succeed when they terminate
  (the goal), CartPole when it is truncated at its time limit without the pole falling.

Steps run synchronously in the event loop: cheap for toy-text and classic-control
envs; wrap heavy simulators in a remote env instead.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from safactory.policy.base import Completion, SamplingParams
from safactory.sim.env import EnvEntry, EnvSpec
from safactory.types import Message, Observation, StepResult, Task, ToolCall, ToolSpec

if TYPE_CHECKING:
    from safactory.sim.env import EnvRegistry

SCHEME = "gym"
ADAPTER_VERSION = "1"
DEFAULT_MAX_TURNS = 100
SPLIT_STRIDE = 1_000_000
ACT_TOOL = "act"

# Action meanings of well-known envs, by Gymnasium spec name (index = action - start).
ACTION_NAMES: dict[str, tuple[str, ...]] = {
    "Taxi": ("south", "north", "east", "west", "pickup", "dropoff"),
    "CliffWalking": ("up", "right", "down", "left"),
    "CliffWalkingSlippery": ("up", "right", "down", "left"),
    "FrozenLake": ("left", "down", "right", "up"),
    "FrozenLake8x8": ("left", "down", "right", "up"),
    "Blackjack": ("stick", "hit"),
    "CartPole": ("push_left", "push_right"),
    "MountainCar": ("accelerate_left", "coast", "accelerate_right"),
    "Acrobot": ("torque_negative", "torque_zero", "torque_positive"),
    "LunarLander": ("noop", "fire_left", "fire_main", "fire_right"),
}
GOALS: dict[str, str] = {
    "Taxi": "Drive the taxi (@) to the passenger, pick them up, and drop them off at the destination.",
    "CliffWalking": "Walk from the start to the goal T without stepping into the cliff C; each step costs 1.",
    "CliffWalkingSlippery": "Walk from the start to the goal T without stepping into the cliff C; the ice is slippery.",
    "FrozenLake": "Walk (@) from S to the goal G without falling into a hole H.",
    "FrozenLake8x8": "Walk (@) from S to the goal G without falling into a hole H.",
    "Blackjack": "Beat the dealer: get a hand closer to 21 than theirs without going over.",
    "CartPole": "Keep the pole balanced on the cart for as long as possible.",
}
# How an episode of a well-known env ends in success, by Gymnasium spec name: "terminated" (only
# reaching the goal terminates; its reward says nothing, e.g. -1 like any step) or "truncated"
# (surviving to the time limit, as CartPole's pole falling is what terminates). `info["success"]` is
# set on every ending step of these envs; other envs leave it to the agent loop (positive final reward).
SUCCESS_ON: dict[str, str] = {
    "CliffWalking": "terminated",
    "CliffWalkingSlippery": "terminated",
    "CartPole": "truncated",
    "MountainCar": "terminated",
    "Acrobot": "terminated",
}
_ANSI_SPAN = re.compile(r"\x1b\[([0-9;]*)m(.*?)\x1b\[0m", re.DOTALL)
_ANSI_ANY = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ACT_TEXT = re.compile(r"act\((.*)\)", re.DOTALL)
_TAXI_LOCS = "RGYB"


class GymEnvError(ValueError):
    """A `gym:` id that cannot be served (unknown env, bad options, not a Discrete action space)."""


def _gymnasium() -> Any:
    try:
        import gymnasium
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise GymEnvError("the gym: adapter needs gymnasium; install it with `pip install gymnasium`") from exc
    return gymnasium


def parse_gym_id(rest: str) -> tuple[str, dict[str, Any]]:
    """Split `Taxi-v3?key=value&...` into the Gymnasium id and `gymnasium.make` keyword arguments."""
    gym_id, _, query = rest.strip().partition("?")
    if not gym_id:
        raise GymEnvError("empty gym id; use gym:<id>, e.g. gym:CliffWalking-v1")
    kwargs: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return gym_id, kwargs


def jsonable(value: Any) -> Any:
    """A JSON-safe copy of an observation or info value (numpy to lists, non-finite floats to strings)."""
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    if hasattr(value, "tolist"):  # numpy arrays and numpy scalars
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return repr(value)


def compact(value: Any) -> str:
    """A short human-readable form of an observation: floats to 4 significant digits."""
    value = jsonable(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(compact(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {compact(v)}" for k, v in value.items()) + "}"
    return str(value)


def strip_ansi(text: str) -> str:
    """Remove colour codes; a span with a background colour (the agent's cell) becomes `@`s."""

    def span(match: re.Match[str]) -> str:
        codes = {c for c in match.group(1).split(";") if c}
        highlighted = any(c.isdigit() and 40 <= int(c) <= 47 for c in codes)
        return "@" * len(match.group(2)) if highlighted else match.group(2)

    return _ANSI_ANY.sub("", _ANSI_SPAN.sub(span, text))


def normalize_name(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _describe(name: str, unwrapped: Any, obs: Any) -> str:
    """A one-line reading of a toy-text observation; empty when unknown or not decodable."""
    try:
        if name == "Taxi":
            row, col, passenger, dest = unwrapped.decode(int(obs))
            where = "in the taxi" if passenger == 4 else f"at {_TAXI_LOCS[passenger]}"
            return f"taxi at row {row}, col {col}; passenger {where}; destination {_TAXI_LOCS[dest]}"
        if name.startswith("FrozenLake"):
            row, col = divmod(int(obs), int(unwrapped.ncol))
            return f"you are at row {row}, col {col}"
        if name.startswith("CliffWalking"):
            row, col = divmod(int(obs), int(unwrapped.shape[1]))
            return f"you (x) are at row {row}, col {col}"
        if name == "Blackjack":
            player, dealer, ace = obs
            return f"your sum {int(player)}, dealer shows {int(dealer)}, usable ace: {'yes' if ace else 'no'}"
    except Exception:  # a different env version with other internals: no description, never an error
        return ""
    return ""


@dataclass(frozen=True)
class GymProfile:
    """What one probe of a Gymnasium env tells us; shared by every episode of that id."""

    env_id: str
    gym_id: str
    make_kwargs: dict[str, Any]
    name: str
    n_actions: int
    start: int
    action_names: tuple[str, ...]
    max_episode_steps: int | None
    ansi: bool
    deterministic_tabular: bool
    spec: EnvSpec = field(compare=False)

    def make(self) -> Any:
        kwargs = dict(self.make_kwargs)
        if self.ansi:
            kwargs["render_mode"] = "ansi"
        return _gymnasium().make(self.gym_id, **kwargs)

    def actions_text(self) -> str:
        if self.action_names:
            return ", ".join(f"{self.start + i} {n}" for i, n in enumerate(self.action_names))
        return f"{self.start}..{self.start + self.n_actions - 1}"

    def prompt(self) -> str:
        goal = GOALS.get(self.name, "")
        return (
            f"You are playing the Gymnasium environment {self.gym_id}. {goal}".rstrip()
            + f"\nActions: {self.actions_text()}. Each turn take one action: call {ACT_TOOL}(<number or name>)"
            " or reply with just the action."
        )


def _action_names(name: str, unwrapped: Any, n: int) -> tuple[str, ...]:
    names: tuple[str, ...] = ACTION_NAMES.get(name, ())
    if not names and hasattr(unwrapped, "get_action_meanings"):
        try:
            names = tuple(str(m) for m in unwrapped.get_action_meanings())
        except Exception:
            names = ()
    names = tuple(normalize_name(n_) for n_ in names)
    if len(names) != n or len(set(names)) != n or any(n_.lstrip("-").isdigit() for n_ in names):
        return ()
    return names


def _is_deterministic_tabular(env: Any) -> bool:
    """True when the env has a transition table `P` with one certain outcome per state and action."""
    gymnasium = _gymnasium()
    table = getattr(env.unwrapped, "P", None)
    if not isinstance(env.observation_space, gymnasium.spaces.Discrete) or not isinstance(table, dict):
        return False
    try:
        return all(len(out) == 1 and out[0][0] == 1.0 for acts in table.values() for out in acts.values())
    except Exception:
        return False


def probe(rest: str, max_turns: int | None = None) -> GymProfile:
    """Make the env once to learn its action space, limits and rendering; raises GymEnvError when unusable."""
    gymnasium = _gymnasium()
    gym_id, kwargs = parse_gym_id(rest)
    if "render_mode" in kwargs:
        raise GymEnvError("render_mode is chosen by the adapter; leave it out of the gym id")
    try:
        env = gymnasium.make(gym_id, **kwargs)
    except Exception as exc:
        raise GymEnvError(f"cannot make gymnasium env {gym_id!r} with {kwargs}: {exc}") from exc
    try:
        space = env.action_space
        if not isinstance(space, gymnasium.spaces.Discrete):
            raise GymEnvError(f"gym:{rest} has action space {space}; the gym adapter needs a Discrete one")
        n, start = int(space.n), int(space.start)
        name = env.spec.name if env.spec is not None else gym_id
        steps = env.spec.max_episode_steps if env.spec is not None else None
        ansi = "ansi" in (env.metadata.get("render_modes") or [])
        names = _action_names(name, env.unwrapped, n)
        tabular = _is_deterministic_tabular(env)
    finally:
        env.close()
    turns = max_turns or steps or DEFAULT_MAX_TURNS
    act = ToolSpec(
        name=ACT_TOOL,
        description="Take one action in the environment.",
        parameters={
            "type": "object",
            "properties": {
                "action": {
                    "type": ["integer", "string"],
                    "description": f"an action number or name: {', '.join(names) or f'{start}..{start + n - 1}'}",
                }
            },
            "required": ["action"],
        },
    )
    spec = EnvSpec(
        id=f"{SCHEME}:{rest}",
        version=f"{ADAPTER_VERSION}+gymnasium-{gymnasium.__version__}",
        tools=(act,),
        max_turns=int(turns),
        description=f"Gymnasium {gym_id} as text; act with {ACT_TOOL}(action).",
    )
    return GymProfile(
        env_id=spec.id,
        gym_id=gym_id,
        make_kwargs=kwargs,
        name=name,
        n_actions=n,
        start=start,
        action_names=names,
        max_episode_steps=steps,
        ansi=ansi,
        deterministic_tabular=tabular,
        spec=spec,
    )


class GymEnv:
    """One episode of a Gymnasium env behind the Environment protocol."""

    def __init__(self, profile: GymProfile | str, *, invalid_action_reward: float = -1.0) -> None:
        self.profile = probe(profile) if isinstance(profile, str) else profile
        self.spec = self.profile.spec
        self.invalid_action_reward = invalid_action_reward
        self.env: Any = None
        self.done = False

    # ---- protocol --------------------------------------------------------------------
    async def reset(self, task: Task, seed: int) -> Observation:
        await self.close()
        self.env = self.profile.make()
        self.done = False
        episode_seed = int(task.data.get("seed", seed))
        obs, info = self.env.reset(seed=episode_seed)
        text = f"{task.prompt}\n\n{self.render(obs)}"
        return Observation(
            messages=[Message(role="user", content=text)],
            tools=list(self.spec.tools),
            info={"seed": episode_seed, "observation": jsonable(obs), "gym_info": jsonable(info)},
        )

    async def step(self, action: Message) -> StepResult:
        if self.env is None:
            raise RuntimeError("step() called before reset()")
        if self.done:
            return StepResult(
                messages=[Message(role="user", content="error: episode is over")],
                terminated=True,
                info={"errors": ["step after the episode ended"]},
            )
        errors: list[str] = []
        replies: list[Message | None] = []  # one per tool call, in order; None marks the act call
        act_call: ToolCall | None = None
        chosen: int | None = None
        if action.tool_calls:
            for call in action.tool_calls:
                if call.name != ACT_TOOL:
                    errors.append(f"unknown tool {call.name!r}")
                    replies.append(self._tool_reply(call, f"error: unknown tool {call.name!r}; use {ACT_TOOL}(action)"))
                elif act_call is not None:
                    errors.append("more than one action in a turn")
                    replies.append(self._tool_reply(call, "error: one action per turn; this call was ignored"))
                else:
                    act_call = call
                    replies.append(None)
                    raw = call.arguments.get("action", next(iter(call.arguments.values()), None))
                    chosen = self._parse_or_record(raw, errors)
        else:
            content = action.content.strip()
            match = _ACT_TEXT.fullmatch(content)
            chosen = self._parse_or_record(match.group(1) if match else content, errors)
        if chosen is None:
            text = f"error: {errors[-1] if errors else 'no action'}; actions: {self.profile.actions_text()}"
            return StepResult(
                messages=self._fill(action, replies, act_call, text),
                reward=self.invalid_action_reward,
                info={"errors": errors, "invalid_action": True},
            )
        obs, reward, terminated, truncated, gym_info = self.env.step(chosen)
        self.done = bool(terminated or truncated)
        text = f"{self.render(obs)}\nreward: {float(reward):g}"
        if self.done:
            text += f"\nepisode over ({'terminated' if terminated else 'truncated'})"
        info: dict[str, Any] = {"action": chosen, "observation": jsonable(obs), "gym_info": jsonable(gym_info)}
        if errors:
            info["errors"] = errors
        success_on = SUCCESS_ON.get(self.profile.name)
        if self.done and success_on is not None:
            info["success"] = bool(terminated) if success_on == "terminated" else bool(truncated and not terminated)
        return StepResult(
            messages=self._fill(action, replies, act_call, text),
            reward=float(reward),
            terminated=bool(terminated),
            truncated=bool(truncated),
            info=info,
        )

    async def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            env.close()

    # ---- helpers ---------------------------------------------------------------------
    def render(self, obs: Any) -> str:
        """The observation as compact text: ansi board, description, raw value."""
        parts: list[str] = []
        if self.profile.ansi:
            try:
                board = self.env.render()
            except Exception:
                board = None
            if isinstance(board, str) and board.strip():
                parts.append(strip_ansi(board).strip("\n"))
        described = _describe(self.profile.name, self.env.unwrapped, obs)
        if described:
            parts.append(described)
        parts.append(f"observation: {compact(obs)}")
        return "\n".join(parts)

    def parse_action(self, raw: Any) -> int:
        """An action number from an int, a numeric string or an action name; ValueError otherwise."""
        p = self.profile
        value: int | None = None
        if isinstance(raw, bool) or raw is None:
            raise ValueError(f"invalid action {raw!r}")
        if isinstance(raw, int):
            value = raw
        elif isinstance(raw, float) and raw.is_integer():
            value = int(raw)
        elif isinstance(raw, str):
            token = raw.strip().strip("`'\"").strip().rstrip(".").strip()
            if re.fullmatch(r"[+-]?\d+", token):
                value = int(token)
            elif normalize_name(token) in p.action_names:
                value = p.start + p.action_names.index(normalize_name(token))
            elif token:
                raise ValueError(f"unknown action {token[:40]!r}")
            else:
                raise ValueError("empty action")
        else:
            raise ValueError(f"invalid action {str(raw)[:40]!r}")
        if not p.start <= value < p.start + p.n_actions:
            raise ValueError(f"action {value} is out of range")
        return value

    def _parse_or_record(self, raw: Any, errors: list[str]) -> int | None:
        try:
            return self.parse_action(raw)
        except ValueError as exc:
            errors.append(str(exc))
            return None

    def _fill(
        self, action: Message, replies: list[Message | None], act_call: ToolCall | None, text: str
    ) -> list[Message]:
        """The step's messages: one tool reply per call (the act call's reply is `text`), or one user message."""
        if not action.tool_calls:
            return [Message(role="user", content=text)]
        out: list[Message] = []
        for reply in replies:
            if reply is None:
                assert act_call is not None
                reply = self._tool_reply(act_call, text)
            out.append(reply)
        return out

    @staticmethod
    def _tool_reply(call: ToolCall, text: str) -> Message:
        return Message(role="tool", content=text, tool_call_id=call.id, name=call.name)


@dataclass
class GymTasks:
    """Tasks of a gym env: one per seed; train seeds `seed + i`, test seeds `split_stride + seed + i`."""

    env_id: str
    prompt: str
    seed: int = 0
    split_stride: int = SPLIT_STRIDE

    def tasks(self, split: str, n: int) -> list[Task]:
        if split not in ("train", "test"):
            raise ValueError(f"{self.env_id} has splits ('train', 'test'), not {split!r}")
        if self.seed < 0 or self.seed + n > self.split_stride:
            raise ValueError(f"seeds {self.seed}..{self.seed + n - 1} leave the {split} range of {self.split_stride}")
        base = self.seed + (self.split_stride if split == "test" else 0)
        return [
            Task(id=f"{self.env_id}/{split}/{s}", env_id=self.env_id, split=split, prompt=self.prompt, data={"seed": s})
            for s in range(base, base + n)
        ]


class GymPlannerExpert:
    """Scripted expert for deterministic tabular envs (Taxi, CliffWalking, FrozenLake without slip).

    It reads the state from the last `observation: <n>` line and takes the first action
    of a shortest path (breadth-first over the env's transition table) to a terminating
    transition with the best terminal reward.
    """

    version = 0

    def __init__(self, profile: GymProfile) -> None:
        self.profile = profile
        env = profile.make()
        try:
            table = env.unwrapped.P
            self.next: dict[int, list[tuple[int, float, bool]]] = {
                int(s): [(int(acts[a][0][1]), float(acts[a][0][2]), bool(acts[a][0][3])) for a in sorted(acts)]
                for s, acts in table.items()
            }
        finally:
            env.close()
        self.best = max((r for outs in self.next.values() for _, r, done in outs if done), default=0.0)

    def plan(self, state: int) -> int:
        """Index (from 0) of the first action on a shortest path to the best terminal transition."""
        first: dict[int, int] = {state: -1}
        queue = deque([state])
        while queue:
            s = queue.popleft()
            for a, (nxt, reward, done) in enumerate(self.next.get(s, [])):
                start = a if first[s] < 0 else first[s]
                if done and reward == self.best:
                    return start
                if not done and nxt not in first:
                    first[nxt] = start
                    queue.append(nxt)
        return 0

    async def generate(self, messages: list[Message], tools: list[ToolSpec], sampling: SamplingParams) -> Completion:
        state = None
        for message in reversed(messages):
            found = re.findall(r"^observation: (-?\d+)$", message.content, re.MULTILINE)
            if found:
                state = int(found[-1])
                break
        index = self.plan(state) if state is not None else 0
        p = self.profile
        name = p.action_names[index] if p.action_names else str(p.start + index)
        call = ToolCall(id=f"call_{len(messages)}", name=ACT_TOOL, arguments={"action": name})
        return Completion(text=f"{ACT_TOOL}({name})", tool_calls=[call], policy_version=self.version)


def make_entry(rest: str) -> EnvEntry:
    """The EnvEntry for `gym:<rest>`; probes the env once (raises GymEnvError when it cannot be served)."""
    profile = probe(rest)
    expert = partial(GymPlannerExpert, profile) if profile.deterministic_tabular else None
    return EnvEntry(
        factory=partial(GymEnv, profile),
        tasks=partial(GymTasks, profile.env_id, profile.prompt()),
        expert=expert,
        spec=profile.spec,
    )


def register(registry: EnvRegistry) -> None:
    """Add the `gym:` scheme to a registry."""
    registry.register_scheme(SCHEME, make_entry)
